"""The live event bus across processes (bot/distributed/bus.py): two RedisHubs on one Redis
prefix stand for two processes — a shopper's stream on one gets the answer streamed on the
other, in order, with the text so far when it connects mid-answer; the console sees every
process's stored messages and owner changes; webhooks fire once; a claim reaches the bot of
every process; a Redis restart closes the streams that may have missed events and the bus
works again. Last, two full services: an SSE stream on one gets the answer the other wrote."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from bot.console.webhooks import Webhooks
from bot.distributed.bus import RedisHub, mirror_taken
from bot.distributed.queue import RedisQueue
from bot.hub import HubSubscription, owner_event
from bot.settings import Settings, WebhookSettings
from channels.base import ConversationEvent
from channels.replay import follow
from channels.stream_cursor import StreamCursor
from cluster.redis import RedisParts
from tests.redis_support import REDIS_URL, private_redis
from tests.support import RunningService, SseEvent, eventually, sse_events, start_service

CID = 7


def ev(kind: Any, seq: int, index: int | None = None, **data: Any) -> ConversationEvent:
    return ConversationEvent(CID, kind, seq, index, data)


def delta(seq: int, index: int) -> ConversationEvent:
    return ev("delta", seq, index, text=f"t{index} ")


@contextlib.asynccontextmanager
async def two_hubs(
    url: str, prefix: str, **options: Any
) -> AsyncIterator[tuple[RedisHub, RedisHub]]:
    """Two processes' buses: each its own connections and process name. (Just started, a
    bus publishes everything for a moment — `grace_s` — so most tests see every event at
    once; `grace_s=0` shows publishing to announced followers only.)"""
    parts = [RedisParts.connect(url, url, url, prefix) for _ in range(2)]
    hubs = [RedisHub(p, retry_s=0.1, **options) for p in parts]
    for h in hubs:
        await h.start()
    try:
        yield hubs[0], hubs[1]
    finally:
        for h, p in zip(hubs, parts, strict=True):
            h.close_all()
            await h.aclose()
            await p.aclose()


@pytest.fixture
async def hubs(redis_prefix: str) -> AsyncIterator[tuple[RedisHub, RedisHub]]:
    async with two_hubs(REDIS_URL, redis_prefix) as pair:
        yield pair


async def take(sub: HubSubscription, n: int) -> list[ConversationEvent]:
    return [e for e in [await asyncio.wait_for(sub.get(), 10) for _ in range(n)] if e]


async def test_a_stream_on_b_gets_the_answer_streamed_on_a_in_order_once(
    hubs: tuple[RedisHub, RedisHub], redis_prefix: str
) -> None:
    a, b = hubs
    on_a, on_b = a.subscribe(CID), b.subscribe(CID)
    await on_b.ready()
    answer = [ev("typing", 3), *(delta(3, i) for i in range(40)), ev("final", 3, text="all")]
    for e in answer:
        a.publish(e)
    # (A may send what it published again when it hears that B follows: clients' cursors
    # drop what they have.)
    cursor = StreamCursor(watermark=2)
    got = [e for e in await _until_final(on_b) if cursor.admit(e)]
    assert [(e.type, e.seq, e.index, e.data) for e in got] == [
        (e.type, e.seq, e.index, e.data) for e in answer
    ]
    assert await take(on_a, len(answer)) == answer  # A's own client: directly, once
    # B's own event reaches B's client once (not again through Redis): A answers to it
    # after it saw it, and Redis hands B any echo of it before A's answer.
    seen_on_a = a.subscribe(CID)
    await seen_on_a.ready()
    b.publish(ev("message", 4, text="thanks"))
    assert (await take(seen_on_a, 1))[0].seq == 4
    a.publish(ev("message", 5, text="welcome"))
    later: list[ConversationEvent] = []
    while not later or later[-1].seq != 5:
        later += [e for e in await take(on_b, 1) if cursor.admit(e)]
    assert [e.seq for e in later] == [4, 5]
    # A process that no longer holds a client of the conversation stops receiving it.
    on_b.close()
    redis = Redis.from_url(REDIS_URL)
    channel = f"{redis_prefix}:bus:c:{CID}"

    async def b_unsubscribed() -> bool:
        # (A still follows it.)
        return dict(await redis.pubsub_numsub(channel))[channel.encode()] == 1

    try:
        await eventually(b_unsubscribed, timeout=10)
    finally:
        await redis.aclose()


class _History:
    """What `follow` needs of a host: the bus, and no stored messages yet."""

    def __init__(self, hub: RedisHub) -> None:
        self.events = hub

    async def list_messages(self, conversation_id: int, **_: Any) -> list[Any]:
        return []


async def test_a_client_connecting_on_b_mid_answer_gets_the_text_so_far(
    hubs: tuple[RedisHub, RedisHub],
) -> None:
    a, b = hubs
    a.publish(ev("typing", 9))
    for i in range(5):
        a.publish(delta(9, i))
    await _follow_answer(a, b, seq=9, then=range(5, 8))
    # The answer is over: nobody connecting later gets its pieces again.
    assert await eventually(lambda: _gone(b), timeout=10)


async def _follow_answer(
    a: RedisHub, b: RedisHub, *, seq: int, then: range, watermark: int | None = None
) -> list[ConversationEvent]:
    """Follow the conversation on B as a client does (`follow`, no stored history); once the
    text so far came, A streams `then` and ends the answer. Checks B got the whole text once."""
    cursor = StreamCursor(watermark=seq - 1 if watermark is None else watermark)
    stream = follow(_History(b), CID, cursor)  # type: ignore[arg-type]
    got: list[ConversationEvent] = []
    async with contextlib.aclosing(stream):
        async for e in stream:
            assert e is not None
            got.append(e)
            if e.type == "delta" and e.index == then.start - 1:
                for i in then:
                    a.publish(delta(seq, i))
                a.publish(ev("final", seq, text="done"))
            if e.type == "final" and e.seq == seq:
                break
    assert [e.index for e in got if e.type == "delta"] == list(range(then.stop)), "no gap"
    assert "".join(e.data["text"] for e in got if e.type == "delta") == "".join(
        f"t{i} " for i in range(then.stop)
    )
    return got


async def _gone(hub: RedisHub) -> bool:
    return await hub.answer_so_far(CID) is None


async def test_the_console_on_b_sees_a_stored_messages_and_owner_changes_not_deltas(
    hubs: tuple[RedisHub, RedisHub],
) -> None:
    a, b = hubs
    console = b.subscribe_all()
    await console.ready()
    a.publish(ev("message", 1, text="hello"))
    a.publish(delta(2, 0))
    a.publish(ev("final", 2, text="hi"))
    a.announce(owner_event(CID, "human", "claim"))
    a.announce(ev("note", 0, text="VIP"))
    got = await take(console, 4)
    assert [e.type for e in got] == ["message", "final", "owner", "note"]
    assert got[2].data == {"conversation_id": CID, "owner": "human", "action": "claim"}


# -- publishing to followers only (no grace: what a process does once it knows the others) --


@pytest.fixture
async def known(redis_prefix: str) -> AsyncIterator[tuple[RedisHub, RedisHub]]:
    async with two_hubs(REDIS_URL, redis_prefix, grace_s=0.0) as pair:
        yield pair


async def test_nothing_is_published_for_a_conversation_no_other_process_follows(
    known: tuple[RedisHub, RedisHub], redis_prefix: str
) -> None:
    a, b = known
    on_a = a.subscribe(CID)  # A's own client: A's business, not Redis's
    await on_a.ready()
    redis = Redis.from_url(REDIS_URL)
    spy = redis.pubsub()
    await spy.psubscribe(f"{redis_prefix}:bus:c:*", f"{redis_prefix}:bus:console")
    try:
        a.publish(ev("typing", 3))
        for i in range(20):
            a.publish(delta(3, i))
        a.publish(ev("final", 3, text="all"))
        assert len(await take(on_a, 22)) == 22
        # Then a conversation B follows: its events go out, and are the first Redis carries.
        other = 8
        on_b = b.subscribe(other)
        await on_b.ready()
        await eventually(lambda: _known(a, other), timeout=10)
        a.publish(ConversationEvent(other, "message", 1, None, {"text": "hi"}))
        assert (await take(on_b, 1))[0].data == {"text": "hi"}
        seen: list[str] = []
        while len(seen) < 1:
            m = await spy.get_message(ignore_subscribe_messages=True, timeout=5)
            if m is not None:
                seen.append(m["channel"].decode())
        assert seen == [f"{redis_prefix}:bus:c:{other}"]
    finally:
        await spy.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def _known(hub: RedisHub, conversation_id: int) -> bool:
    return hub.followed_elsewhere(conversation_id)


async def test_a_follower_that_comes_mid_answer_gets_what_it_missed(
    known: tuple[RedisHub, RedisHub],
) -> None:
    a, b = known
    a.publish(ev("message", 8, text="where is my parcel?"))  # stored before anyone followed
    a.publish(ev("typing", 9))
    for i in range(5):
        a.publish(delta(9, i))
    got = await _follow_answer(a, b, seq=9, then=range(5, 8), watermark=7)
    assert got[0].type == "message" and got[0].seq == 8


async def test_an_answer_that_ended_before_the_follower_was_known_still_reaches_it(
    known: tuple[RedisHub, RedisHub],
) -> None:
    """The follower read the database before the answer was stored, and A stored it before
    it heard of the follower: A sends its recent stored-message events to a new follower."""
    a, b = known
    on_b = b.subscribe(CID)
    a.publish(ev("typing", 4))
    a.publish(delta(4, 0))
    a.publish(ev("final", 4, text="it ships today"))
    await on_b.ready()
    got = await _until_final(on_b)
    assert got[-1].data == {"text": "it ships today"}


async def test_a_console_opened_on_b_gets_a_events_once_a_knows_of_it(
    known: tuple[RedisHub, RedisHub],
) -> None:
    a, b = known
    a.publish(ev("message", 1, text="hello"))  # before the console: sent to it once known
    console = b.subscribe_all()
    await console.ready()
    await eventually(lambda: _console_known(a), timeout=10)
    a.publish(delta(2, 0))
    a.publish(ev("final", 2, text="hi"))
    a.announce(ev("note", 0, text="VIP"))
    assert [e.type for e in await take(console, 3)] == ["message", "final", "note"]
    console.close()
    await eventually(lambda: _console_known(a, False), timeout=10)


async def _console_known(hub: RedisHub, expected: bool = True) -> bool:
    return hub.console_elsewhere() == expected


async def test_a_process_that_stops_is_no_longer_followed(redis_prefix: str) -> None:
    async with two_hubs(REDIS_URL, redis_prefix, grace_s=0.0) as (a, b):
        on_b = b.subscribe(CID)
        await on_b.ready()
        await eventually(lambda: _known(a, CID), timeout=10)
        await b.aclose()
        await eventually(lambda: _not_known(a, CID), timeout=10)


async def _not_known(hub: RedisHub, conversation_id: int) -> bool:
    return not hub.followed_elsewhere(conversation_id)


async def test_webhooks_fire_once_for_an_event_whichever_processes_run(
    hubs: tuple[RedisHub, RedisHub], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    posted: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        posted.append(await request.json())
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret_env="HOOK_SECRET")

    class Db:
        async def read(self, fn: Any) -> dict[str, Any]:
            return {"id": CID}

        async def write(self, fn: Any) -> None:
            return None

    a, b = hubs
    senders = [Webhooks([hook], hub, Db()) for hub in (a, b)]  # type: ignore[arg-type]
    console_b = b.subscribe_all()
    await console_b.ready()
    try:
        for s in senders:
            s.start()
        await asyncio.sleep(0)  # (their listeners subscribe)
        a.announce(owner_event(CID, "human", "claim"))
        # B saw the claim too (its console did) ...
        assert (await take(console_b, 1))[0].data["action"] == "claim"
        b.announce(owner_event(CID, "resolved", "resolve"))
        await eventually(lambda: _count(posted, 2), timeout=10)
        # ... yet each event was posted once, by the process that made it.
        assert sorted(p["event"] for p in posted) == [
            "conversation.claimed",
            "conversation.resolved",
        ]
    finally:
        for s in senders:
            await s.close()
        await runner.cleanup()


async def _count(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_a_claim_on_a_stops_the_bot_on_b_and_a_handback_lets_it_answer(
    hubs: tuple[RedisHub, RedisHub],
) -> None:
    a, b = hubs
    taken_on_a: set[int] = set()
    taken_on_b: set[int] = set()
    a.on_owner_change(mirror_taken(taken_on_a))
    b.on_owner_change(mirror_taken(taken_on_b))
    console_b = b.subscribe_all()
    await console_b.ready()

    async def b_has_taken(expected: bool) -> bool:
        return (CID in taken_on_b) == expected

    a.announce(owner_event(CID, "human", "claim"))
    await eventually(lambda: b_has_taken(True), timeout=10)
    # A handoff request is no move: the bot's turn is left as it is.
    a.announce(owner_event(CID, "handoff_requested", "handoff", "angry"))
    a.announce(owner_event(CID, "bot", "handback"))
    await eventually(lambda: b_has_taken(False), timeout=10)
    assert [e.data["action"] for e in await take(console_b, 3)] == [
        "claim",
        "handoff",
        "handback",
    ]
    assert taken_on_a == set(), "a process's own moves are the host's business"


async def test_after_a_redis_restart_streams_resume_and_events_flow_again(
    tmp_path: Path,
) -> None:
    async with (
        private_redis(tmp_path) as server,
        two_hubs(server.url, "sdtest-restart") as (a, b),
    ):
        on_a, on_b = a.subscribe(CID), b.subscribe(CID)
        console_b = b.subscribe_all()
        await on_b.ready()
        await console_b.ready()
        a.publish(ev("typing", 3))
        a.publish(delta(3, 0))
        a.publish(delta(3, 1))
        got: list[ConversationEvent] = []
        while not any(e.type == "delta" and e.index == 1 for e in got):
            got += await take(on_b, 1)  # (the typing signal is not sent again to a follower)

        await server.restart()  # everything in Redis is gone
        a.publish(delta(3, 2))
        # Local clients never notice.
        assert [e.index for e in await take(on_a, 4)][1:] == [0, 1, 2]
        # B's stream may have missed events: it ends (its client reconnects and resumes
        # from the database), as does the console's.
        await _ended(on_b)
        await _ended(console_b)

        again = b.subscribe(CID)
        await again.ready()
        # A sent the text so far again to B, which followed anew, for clients connecting now.

        async def sent_again() -> bool:
            now = await b.answer_so_far(CID)
            return now == (3, ["t0 ", "t1 ", "t2 "])

        await eventually(sent_again, timeout=15)
        a.publish(delta(3, 3))
        a.publish(ev("final", 3, text="done"))
        got = [(e.type, e.index) for e in await _until_final(again)]
        assert got[-2:] == [("delta", 3), ("final", None)]
        assert {i for kind, i in got if kind == "delta"} == {0, 1, 2, 3}
        console_again = b.subscribe_all()
        await console_again.ready()
        a.announce(owner_event(CID, "human", "claim"))
        assert (await take(console_again, 1))[0].type == "owner"


async def _until_final(sub: HubSubscription) -> list[ConversationEvent]:
    got: list[ConversationEvent] = []
    while not got or got[-1].type != "final":
        got += await take(sub, 1)
    return got


async def _ended(sub: HubSubscription) -> None:
    with pytest.raises(EOFError):
        while True:
            await asyncio.wait_for(sub.get(), 20)


# -- two services ---------------------------------------------------------------------------

PARTITIONS = 8


def _queue(svc: RunningService) -> RedisQueue:
    q = svc.services.pipeline.queue
    assert isinstance(q, RedisQueue)
    return q


async def _read_until(
    svc: RunningService, cid: int, after: int, stop: Callable[[SseEvent], bool]
) -> list[SseEvent]:
    got: list[SseEvent] = []
    url = f"/api/v1/conversations/{cid}/stream"
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": after}) as r:
        assert r.status_code == 200
        async for e in sse_events(r):
            got.append(e)
            if stop(e):
                break
    return got


async def test_an_sse_stream_on_b_gets_the_answer_service_a_writes(
    pg: str, redis_prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    def settings() -> Settings:
        return settings_factory(
            pg,
            queue={
                "backend": "redis",
                "url": REDIS_URL,
                "key_prefix": redis_prefix,
                "partitions": PARTITIONS,
                "lease_seconds": 5,  # (a slow, busy machine keeps its leases)
                "sweep_seconds": 1,
            },
        )

    a = await start_service(settings())
    b = await start_service(settings())
    try:
        qa, qb = _queue(a), _queue(b)

        async def split() -> bool:
            return bool(qa.held and qb.held and len(qa.held) + len(qb.held) == PARTITIONS)

        await eventually(split, timeout=20)
        # A conversation whose turn A holds.
        for n in range(40):
            r = await a.post(contact_id=f"shopper-{n}", text="hello", client_message_id=f"h{n}")
            cid = r.json()["conversation_id"]
            if cid % PARTITIONS in qa.held:
                break
        else:
            raise AssertionError("no conversation fell in A's partitions")
        await eventually(lambda: a.answered(cid, r.json()["message_id"]), timeout=30)

        r = await b.post(
            contact_id=f"shopper-{n}",
            conversation_id=cid,
            text="tell me about returns [[sim:tps=40]] [[sim:tokens=60]]",
        )
        seq = r.json()["seq"]
        # A stream on B that drops after a few pieces, then one that starts afresh on B
        # mid-answer: it gets the text so far (from Redis: A writes it), then the rest.
        first = await asyncio.wait_for(
            _read_until(b, cid, seq, lambda e: e.event == "delta" and e.data["index"] >= 3), 30
        )
        second = await asyncio.wait_for(
            _read_until(b, cid, seq, lambda e: e.event in ("final", "error")), 30
        )
        assert cid % PARTITIONS in qa.held, "A wrote the answer"
        deltas = [e for e in second if e.event == "delta"]
        assert [d.data["index"] for d in deltas] == list(range(len(deltas))), "no gap"
        assert second[-1].event == "final"
        assert "".join(d.data["text"] for d in deltas) == second[-1].data["text"]
        assert [d.data for d in first if d.event == "delta"] == [d.data for d in deltas[:4]]
    finally:
        await a.stop()
        await b.stop()
