"""The Redis work queue (queue.backend: redis): two services on one PostgreSQL database and one
Redis share the work — every message answered once and in order, whichever service took it;
partitions spread between them and move on when one stops; the fence keeps a process that lost
its lease from storing an answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from sqlalchemy import select

from bot.distributed.queue import RedisQueue
from bot.settings import Settings
from storage import fences
from storage.fences import FenceLost
from storage.models import Message
from tests.redis_support import REDIS_URL
from tests.support import RunningService, eventually, start_service

PARTITIONS = 8


def _redis_settings(
    factory: Callable[..., Settings], db: str, prefix: str, **queue: Any
) -> Settings:
    return factory(
        db,
        queue={
            "backend": "redis",
            "url": REDIS_URL,
            "key_prefix": prefix,
            "partitions": PARTITIONS,
            "lease_seconds": 2,
            "sweep_seconds": 1,
            **queue,
        },
    )


def _queue(svc: RunningService) -> RedisQueue:
    q = svc.services.pipeline.queue
    assert isinstance(q, RedisQueue)
    return q


async def _answers(svc: RunningService) -> list[Message]:
    async with svc.services.sessions() as s:
        rows = (await s.execute(select(Message).order_by(Message.id))).scalars()
        return list(rows)


async def test_two_services_answer_every_message_once_and_in_order(
    pg: str, redis_prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    a = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    b = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    try:
        # Both hold some partitions once they saw each other.
        await eventually(lambda: _split(a, b), timeout=20)
        sent: dict[int, list[int]] = {}
        for round_ in range(4):
            posts = []
            for shopper in range(6):
                svc = a if (shopper + round_) % 2 else b  # one shopper's messages on both
                posts.append(
                    svc.post(
                        contact_id=f"shopper-{shopper}",
                        text=f"question {round_} from {shopper}: where is my parcel?",
                        client_message_id=f"{shopper}-{round_}",
                    )
                )
            for r in await asyncio.gather(*posts):
                assert r.status_code == 202, r.text
                body = r.json()
                sent.setdefault(body["conversation_id"], []).append(body["message_id"])

        async def all_answered() -> bool:
            rows = await _answers(a)
            answered = [m for m in rows if m.direction == "out" and m.status == "sent"]
            return len(answered) == sum(map(len, sent.values()))

        await eventually(all_answered, timeout=60)
        rows = await _answers(a)
        for cid, inbound in sent.items():
            mine = sorted((m for m in rows if m.conversation_id == cid), key=lambda m: m.seq)
            answers = [m for m in mine if m.direction == "out"]
            # Exactly one answer per message, nothing abandoned, in the messages' order.
            assert [m.status for m in answers] == ["sent"] * len(inbound)
            assert [m.reply_to_id for m in answers] == sorted(inbound)
            # Each answer comes after its own question in the conversation.
            seq_of = {m.id: m.seq for m in mine}
            assert all(m.seq > seq_of[m.reply_to_id] for m in answers)
        # A redelivery on the other service is the same message, not a new one.
        again = await a.post(
            contact_id="shopper-1",
            text="question 0 from 1: where is my parcel?",
            client_message_id="1-0",
        )
        assert again.json()["duplicate"] is True
    finally:
        await a.stop()
        await b.stop()


async def _split(a: RunningService, b: RunningService) -> bool:
    qa, qb = _queue(a), _queue(b)
    return bool(qa.held and qb.held and len(qa.held) + len(qb.held) == PARTITIONS)


async def test_a_stopping_service_hands_its_work_over(
    pg: str, redis_prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    a = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    b = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    stopped = False
    try:
        await eventually(lambda: _split(a, b), timeout=20)
        # A stops (a rolling restart): its partitions are given back at once and B takes them.
        await a.stop()
        stopped = True
        await eventually(lambda: _all_held(b), timeout=20)
        r = await b.post(contact_id="late", text="hello, anyone?", client_message_id="late-1")
        body = r.json()
        stored = await eventually(lambda: b.answered(body["conversation_id"], body["message_id"]))
        assert stored["status"] == "sent"
    finally:
        if not stopped:
            await a.stop()
        await b.stop()


async def _all_held(svc: RunningService) -> bool:
    return len(_queue(svc).held) == PARTITIONS


async def test_messages_redis_lost_are_answered_from_the_database(
    pg: str, redis_prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    """A message stored while its queue entry was lost (a crash between the two, a Redis
    restart) is found by the sweep and answered once."""
    svc = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    try:
        await eventually(lambda: _all_held(svc), timeout=20)
        q = _queue(svc)

        async def lose(conversation_id: int, message_id: int, unlock: object = None) -> None:
            return None  # the entry never reaches Redis (the chat's lock is freed after)

        q.put = lose  # type: ignore[method-assign]
        r = await svc.post(contact_id="lost", text="is anyone there?", client_message_id="l1")
        body = r.json()
        stored = await eventually(
            lambda: svc.answered(body["conversation_id"], body["message_id"]), timeout=30
        )
        assert stored["status"] == "sent"
    finally:
        await svc.stop()


async def test_a_process_that_lost_its_lease_cannot_store_an_answer(
    pg: str, settings_factory: Callable[..., Settings]
) -> None:
    svc = await start_service(settings_factory(pg))
    try:
        db = svc.services.pipeline.parts.db
        old = await db.write(partial(fences.take_partition, partitions=8, partition=3, holder="a"))
        new = await db.write(partial(fences.take_partition, partitions=8, partition=3, holder="b"))
        assert new.token == old.token + 1
        await db.read(partial(fences.check, fence=new))
        with pytest.raises(FenceLost):
            await db.read(partial(fences.check, fence=old))
    finally:
        await svc.stop()


async def test_a_process_that_splits_conversations_differently_is_refused(
    pg: str, redis_prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    """Two processes with different queue.partitions would both answer some conversations:
    the second one does not start, and says what to set."""
    a = await start_service(_redis_settings(settings_factory, pg, redis_prefix))
    try:
        with pytest.raises(RuntimeError, match=r"queue\.partitions is 16 here but 8"):
            await start_service(_redis_settings(settings_factory, pg, redis_prefix, partitions=16))
    finally:
        await a.stop()
