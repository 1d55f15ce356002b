"""The turn's hot path (store + reserve, finish) gives the same results on every database and
executor: PostgreSQL runs it as data-modifying CTEs (storage/pg_turns.py), SQLite as the
plain statements of storage.inbound / storage.answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage import answers, db, executor, fences, inbound, statements
from storage.models import Direction, MessageStatus, Sender
from storage.rows import NewMessage, StoredMessage


@pytest.fixture(params=["threads", "async-engine"])
async def units(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[executor.Database]:
    engine = db.create_engine(db_url)
    await db.upgrade(engine)
    database: executor.Database = (
        executor.for_engine(engine)
        if request.param == "threads"
        else executor.AsyncEngineDatabase(engine)
    )
    yield database
    await database.close()
    await engine.dispose()


def _target(
    contact: str, conversation_id: int | None, attributes: dict[str, Any] | None = None
) -> inbound.InboundTarget:
    return inbound.InboundTarget(
        "api", "default", contact, contact, None, conversation_id, attributes
    )


def _inbound(text: str) -> NewMessage:
    return NewMessage(
        Direction.IN.value, Sender.CONTACT.value, MessageStatus.RECEIVED.value, text=text
    )


async def _store(
    units: executor.Database,
    contact: str,
    text: str,
    cid: int | None,
    attributes: dict[str, Any] | None = None,
) -> tuple[StoredMessage, answers.Answering | None]:
    row, _, answering = await units.write(
        partial(
            inbound.store_inbound,
            target=_target(contact, cid, attributes),
            m=_inbound(text),
            prepare=inbound.Prepare(40),
        )
    )
    return row, answering


def _call(cost: float) -> dict[str, Any]:
    return {
        "provider": "sim",
        "model": "sim-cheap",
        "tier": "cheap",
        "specialist": "logistics",
        "purpose": "reply",
        "intent": "logistics",
        "first_token_ms": 300.0,
        "latency_ms": 900.0,
        "input_tokens": 120,
        "output_tokens": 40,
        "usage_estimated": False,
        "cost": cost,
        "outcome": "ok",
        "error": None,
    }


async def _finish(
    units: executor.Database, q: StoredMessage, a: answers.Answering, text: str, cost: float
) -> StoredMessage:
    final = answers.FinalAnswer(
        conversation_id=q.conversation_id,
        inbound_id=q.id,
        out_id=a.out_id,
        out_seq=a.seq,
        out_created_at=a.out_created_at,
        text=text,
        calls=[_call(cost)],
        model="sim/sim-cheap",
        tier="cheap",
        first_delta_ms=301.0,
        latency_ms=900.0,
        routing={"degraded": False, "intents": ["logistics"]},
        delivered=True,
    )
    return await units.write(partial(answers.finish_answer, a=final))


async def test_the_answer_reserved_with_a_message_is_the_one_the_worker_would_begin(
    units: executor.Database,
) -> None:
    first, a1 = await _store(units, "fay", "where is ORD-1001?", None)
    assert a1 is not None
    stored = await _finish(units, first, a1, "It left the warehouse.", 0.002)
    assert stored.status == MessageStatus.SENT.value
    cid = first.conversation_id
    # The next message names the conversation and says who the shopper is now.
    second, a2 = await _store(units, "fay", "and ORD-1002?", cid, {"verified": False})
    assert a2 is not None
    begun = await units.write(
        partial(
            answers.begin_answer,
            conversation_id=cid,
            message_id=second.id,
            history_limit=40,
            with_inbound=True,
        )
    )
    assert isinstance(begun, answers.Answering)
    # The worker taking the reservation over sees exactly what ingest handed it.
    assert (a2.out_id, a2.seq, a2.conversation, a2.question, a2.history) == (
        begun.out_id,
        begun.seq,
        begun.conversation,
        begun.question,
        begun.history,
    )
    assert a2.contact_attributes == begun.contact_attributes == {"verified": False}
    assert (a2.tier, a2.cost_total) == (begun.tier, begun.cost_total) == ("cheap", 0.002)
    assert [t.text for t in a2.history] == ["where is ORD-1001?", "It left the warehouse."]
    assert a2.inbound == second
    await _finish(units, second, a2, "It arrives tomorrow.", 0.003)

    def ledger(conn: Any) -> tuple[Any, ...]:
        c, m, calls = statements.C, statements.M, statements.LLM_CALLS.c
        conv = conn.execute(select(c.cost_total, c.tier).where(c.id == cid)).one()
        rows = conn.execute(
            select(m.seq, m.status, m.input_tokens, m.routing)
            .where(m.conversation_id == cid)
            .order_by(m.seq)
        ).all()
        spent = conn.execute(
            select(calls.message_id, calls.cost, calls.usage_estimated).order_by(calls.id)
        ).all()
        return tuple(conv), [tuple(r) for r in rows], [tuple(s) for s in spent]

    conv, rows, spent = await units.read(ledger)
    assert conv[0] == pytest.approx(0.005) and conv[1] == "cheap"
    routing = {"degraded": False, "intents": ["logistics"]}
    assert rows == [
        (1, "answered", None, routing),
        (2, "sent", 120, routing),
        (3, "answered", None, routing),
        (4, "sent", 120, routing),
    ]
    assert spent == [(first.id, 0.002, False), (second.id, 0.003, False)]


async def test_messages_stored_at_once_reserve_at_most_the_first_answer(
    units: executor.Database,
) -> None:
    """Two messages of an idle conversation stored at the same moment (two replicas): only
    the one stored first may have its answer reserved, so answers keep the order."""
    first, a = await _store(units, "gus", "hello", None)
    assert a is not None
    cid = first.conversation_id
    for round_ in range(6):
        await _finish(units, first, a, f"answer {round_}", 0.0)
        both = await asyncio.gather(
            _store(units, "gus", f"x{round_}", cid), _store(units, "gus", f"y{round_}", cid)
        )
        reserved = [(row, ans) for row, ans in both if ans is not None]
        assert len(reserved) <= 1
        earlier = min((row for row, _ in both), key=lambda r: r.seq)
        for row, ans in reserved:
            assert row.id == earlier.id and ans.seq == row.seq + 1
        # Answer what waits, in order, as the worker would.
        for row in sorted((row for row, _ in both), key=lambda r: r.seq):
            begun = await units.write(
                partial(
                    answers.begin_answer,
                    conversation_id=cid,
                    message_id=row.id,
                    history_limit=40,
                    with_inbound=False,
                )
            )
            assert isinstance(begun, answers.Answering)
            first, a = row, begun
            if row is not max((r for r, _ in both), key=lambda r: r.seq):
                await _finish(units, row, begun, "ok", 0.0)


async def test_an_answer_written_under_a_lost_lease_is_not_stored(
    units: executor.Database,
) -> None:
    """The fencing token is checked in the transaction that stores the answer: after
    another process took the partition, the old holder's answer leaves nothing behind."""
    q, a = await _store(units, "hal", "refund for ORD-1007?", None)
    assert a is not None
    old = await units.write(
        partial(fences.take_partition, partitions=8, partition=3, holder="process-a")
    )
    new = await units.write(
        partial(fences.take_partition, partitions=8, partition=3, holder="process-b")
    )

    def final(fence: fences.Fence) -> answers.FinalAnswer:
        return answers.FinalAnswer(
            conversation_id=q.conversation_id,
            inbound_id=q.id,
            out_id=a.out_id,
            out_seq=a.seq,
            out_created_at=a.out_created_at,
            text=f"written under token {fence.token}",
            calls=[_call(0.001)],
            model="sim/sim-cheap",
            tier="cheap",
            first_delta_ms=300.0,
            latency_ms=800.0,
            routing=None,
            delivered=True,
            fence=fence,
        )

    with pytest.raises(fences.FenceLost):
        await units.write(partial(answers.finish_answer, a=final(old)))

    def state(conn: Any) -> tuple[Any, ...]:
        m, calls = statements.M, statements.LLM_CALLS.c
        rows = conn.execute(
            select(m.status, m.text).where(m.conversation_id == q.conversation_id).order_by(m.seq)
        ).all()
        return [tuple(r) for r in rows], conn.execute(select(calls.id)).all()

    assert await units.read(state) == (
        [("received", "refund for ORD-1007?"), ("streaming", "")],
        [],
    )
    stored = await units.write(partial(answers.finish_answer, a=final(new)))
    assert stored.status == MessageStatus.SENT.value
    rows, calls = await units.read(state)
    assert rows == [
        ("answered", "refund for ORD-1007?"),
        ("sent", f"written under token {new.token}"),
    ]
    assert len(calls) == 1


async def test_a_redelivery_to_a_named_conversation_changes_nothing(
    units: executor.Database,
) -> None:
    first, _ = await _store(units, "ida", "hello", None)
    cid = first.conversation_id
    new = NewMessage(
        Direction.IN.value,
        Sender.CONTACT.value,
        MessageStatus.RECEIVED.value,
        text="is ORD-1003 shipped?",
        external_id="wx-1",
    )
    store = partial(
        inbound.store_inbound,
        target=_target("ida", cid, {"verified": False}),
        m=new,
        prepare=inbound.Prepare(40),
    )
    row, _, _ = await units.write(store)
    with pytest.raises(IntegrityError):
        await units.write(store)
    dup = await units.read(
        partial(inbound.find_by_external_id, channel="api", account="default", external_id="wx-1")
    )
    assert dup is not None and (dup.message_id, dup.seq) == (row.id, row.seq)
    # The refused store took no seq: the next message follows without a gap.
    after, _ = await _store(units, "ida", "thanks", cid)
    assert after.seq == row.seq + 1


async def test_a_turn_begun_under_a_lost_lease_reserves_nothing(
    units: executor.Database,
) -> None:
    """A process that does not know yet that another took the partition must not take a seq
    for an answer: the new holder answers the conversation's earlier messages first, and an
    answer reserved by the old one would come before theirs."""
    first, a = await _store(units, "ida", "where is ORD-1001?", None)
    assert a is not None
    second, none = await _store(units, "ida", "and can I return it?", first.conversation_id)
    assert none is None  # (the conversation is busy: the worker reserves when it begins)
    old = await units.write(
        partial(fences.take_partition, partitions=8, partition=5, holder="process-a")
    )
    new = await units.write(
        partial(fences.take_partition, partitions=8, partition=5, holder="process-b")
    )

    def begin(fence: fences.Fence) -> Any:
        return partial(
            answers.begin_answer,
            conversation_id=second.conversation_id,
            message_id=second.id,
            history_limit=40,
            with_inbound=False,
            fence=fence,
        )

    def seqs(conn: Any) -> list[int]:
        m = statements.M
        q = select(m.seq).where(m.conversation_id == first.conversation_id).order_by(m.seq)
        return list(conn.execute(q).scalars())

    before = await units.read(seqs)
    with pytest.raises(fences.FenceLost):
        await units.write(begin(old))
    assert await units.read(seqs) == before, "no seq taken"
    begun = await units.write(begin(new))
    assert isinstance(begun, answers.Answering) and begun.seq == max(before) + 1
