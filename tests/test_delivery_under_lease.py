"""Delivering an answer under a work partition's lease (queue.backend: redis): a send that
the lease stopped is not a person taking over. Lost lease: the answer stays pending, for the
partition's next holder to send; a renewal that was only late: the answer goes out now. Only
a person taking over abandons it."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.pipeline.outbox import Outbox
from bot.workqueue import WORK_LEASE
from channels.base import Delivery, TakenOver, guard_sends, may_send
from storage.models import MessageStatus


class Lease:
    fence: Any = None

    def __init__(self, held: bool, valid: bool) -> None:
        self._held, self._valid = held, valid

    def held(self) -> bool:
        return self._held

    def valid(self) -> bool:
        return self._valid


class Db:
    """Records the delivery statuses the outbox writes."""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    async def write(self, fn: Any, **_: Any) -> None:
        self.statuses.append(fn.keywords["status"])


def platform() -> tuple[list[str], Any]:
    sent: list[str] = []

    async def send() -> Delivery:
        if not may_send():
            raise TakenOver
        sent.append("the answer")
        return Delivery(platform_message_ids=["m1"])

    return sent, send


async def deliver(lease: Lease, taken: bool = False) -> tuple[list[str], list[str]]:
    db = Db()
    sent, send = platform()
    WORK_LEASE.set(lease)
    guard_sends(lambda: not taken and lease.valid())
    await Outbox(db).deliver(41, 7, send)  # type: ignore[arg-type]
    return sent, db.statuses


async def test_a_lost_lease_leaves_the_answer_pending_for_the_next_holder() -> None:
    sent, statuses = await deliver(Lease(held=False, valid=False))
    assert sent == [] and statuses == [], "not sent, not marked: still pending"


async def test_a_late_renewal_sends_the_answer_once_it_comes() -> None:
    lease = Lease(held=True, valid=False)

    async def renew() -> None:
        await asyncio.sleep(0.2)
        lease._valid = True

    renewing = asyncio.create_task(renew())
    sent, statuses = await deliver(lease)
    await renewing
    assert sent == ["the answer"] and statuses == [MessageStatus.SENT.value]


async def test_a_person_taking_over_abandons_the_answer() -> None:
    sent, statuses = await deliver(Lease(held=True, valid=True), taken=True)
    assert sent == [] and statuses == [MessageStatus.ABANDONED.value]
