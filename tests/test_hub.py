"""The in-process event bus: order, heartbeat timeouts, slow subscribers, closing."""

from __future__ import annotations

import asyncio

import pytest

from bot.hub import Hub
from channels.base import ConversationEvent


def delta(seq: int, index: int) -> ConversationEvent:
    return ConversationEvent(7, "delta", seq, index, {"text": f"t{index}"})


async def test_events_arrive_in_order_and_quiet_spells_time_out() -> None:
    hub = Hub()
    sub = hub.subscribe(7)
    for i in range(3):
        hub.publish(delta(2, i))
    assert [(await sub.get(0.05)) for _ in range(3)] == [delta(2, i) for i in range(3)]
    # Nothing comes: each get gives up after its own timeout, again and again.
    assert await sub.get(0.02) is None
    assert await sub.get(0.02) is None

    async def later() -> None:
        await asyncio.sleep(0.03)
        hub.publish(delta(2, 3))

    task = asyncio.create_task(later())
    # An event before the timeout wins, even when an earlier get armed a timer.
    assert await sub.get(5) == delta(2, 3)
    await task
    assert await sub.get(0.01) is None


async def test_a_short_timeout_after_a_long_one_is_honoured() -> None:
    hub = Hub()
    sub = hub.subscribe(7)
    waiting = asyncio.create_task(sub.get(60))
    await asyncio.sleep(0.01)
    hub.publish(delta(1, 0))
    assert await waiting == delta(1, 0)
    assert await asyncio.wait_for(sub.get(0.02), 1) is None


async def test_a_subscriber_that_falls_behind_is_dropped_after_what_it_has() -> None:
    hub = Hub(queue_size=3)
    slow, fast = hub.subscribe(7), hub.subscribe(7)
    for i in range(4):
        hub.publish(delta(1, i))
        assert await fast.get(0.1) == delta(1, i)
    assert slow.overflowed and slow.closed
    assert [await slow.get(0.1) for _ in range(3)] == [delta(1, i) for i in range(3)]
    with pytest.raises(EOFError):
        await slow.get(0.1)
    assert hub.subscriber_count == 1


async def test_close_all_ends_waiting_streams() -> None:
    hub = Hub()
    sub = hub.subscribe(7)
    waiting = asyncio.create_task(sub.get(60))
    await asyncio.sleep(0)
    hub.close_all()
    with pytest.raises(EOFError):
        await asyncio.wait_for(waiting, 1)
    assert hub.subscriber_count == 0


async def test_the_answer_in_flight_is_known_from_its_typing_signal_on() -> None:
    hub = Hub()
    hub.publish(ConversationEvent(7, "typing", 4))
    assert hub.inflight(7) == (4, [])  # begun, no text yet: a late subscriber is told
    hub.publish(delta(4, 0))
    assert hub.inflight(7) == (4, ["t0"])
    hub.publish(ConversationEvent(7, "final", 4, None, {"text": "t0"}))
    assert hub.inflight(7) is None
