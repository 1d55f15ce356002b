"""The unit-of-work executor (storage/executor.py) and the message statements
(storage/inbound.py, answers.py, reads.py): one writer and read-only readers for SQLite, the
async pool for PostgreSQL, and the rules the pipeline relies on (a failed unit leaves nothing
behind, seqs stay contiguous under concurrent writers and readers, a redelivery hits the
unique key)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

from storage import agents, answers, db, executor, handoff, inbound, reads, recovery, statements
from storage.models import Direction, MessageStatus, Sender
from storage.rows import NewMessage, StoredMessage


@pytest.fixture(params=["threads", "async-engine"])
async def units(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[executor.Database]:
    """What the service uses (threads), and the async engine it falls back to (PostgreSQL
    without psycopg or with asyncpg options in the URL, SQLite in memory)."""
    engine = db.create_engine(db_url)
    await db.upgrade(engine)
    database: executor.Database
    if request.param == "threads":
        database = executor.for_engine(engine)
        assert not isinstance(database, executor.AsyncEngineDatabase)
    else:
        database = executor.AsyncEngineDatabase(engine)
    yield database
    await database.close()
    await engine.dispose()


def _target(contact: str, conversation_id: int | None = None) -> inbound.InboundTarget:
    return inbound.InboundTarget("api", "default", contact, contact, None, conversation_id, None)


def _inbound(text: str, external_id: str | None = None) -> NewMessage:
    return NewMessage(
        Direction.IN.value,
        Sender.CONTACT.value,
        MessageStatus.RECEIVED.value,
        text=text,
        external_id=external_id,
    )


def _final(
    q: StoredMessage, begun: answers.Answering, text: str, *, delivered: bool
) -> answers.FinalAnswer:
    return answers.FinalAnswer(
        conversation_id=q.conversation_id,
        inbound_id=q.id,
        out_id=begun.out_id,
        out_seq=begun.seq,
        out_created_at=begun.out_created_at,
        text=text,
        calls=[],
        model=None,
        tier=None,
        first_delta_ms=None,
        latency_ms=1.0,
        routing=None,
        delivered=delivered,
    )


async def _post(
    units: executor.Database, contact: str, text: str, conversation_id: int | None = None
) -> StoredMessage:
    row, _, _ = await units.write(
        partial(inbound.store_inbound, target=_target(contact, conversation_id), m=_inbound(text))
    )
    return row


async def test_sqlite_runs_units_on_a_writer_and_readers(sqlite_url: str) -> None:
    engine = db.create_engine(sqlite_url)
    await db.upgrade(engine)
    database = executor.for_engine(engine)
    try:
        assert isinstance(database, executor.SqliteThreads)
        row = await _post(database, "ann", "hello")
        # Readers see what the writer committed, and cannot write themselves.
        got = await database.read(partial(reads.get_message, message_id=row.id))
        assert got is not None and got.text == "hello"
        with pytest.raises(OperationalError, match="readonly"):
            await database.read(
                lambda conn: conn.execute(
                    insert(statements.MESSAGES).values(
                        conversation_id=row.conversation_id,
                        seq=99,
                        channel="api",
                        account="default",
                        direction="in",
                        sender="contact",
                        status="received",
                    )
                )
            )
    finally:
        await database.close()
        await engine.dispose()


async def test_a_failed_unit_leaves_nothing_behind(units: executor.Database) -> None:
    first = await _post(units, "bo", "one")

    def half_done(conn: Connection) -> None:
        inbound.store_inbound(conn, _target("bo", first.conversation_id), _inbound("two"))
        raise RuntimeError("the unit fails after its first write")

    with pytest.raises(RuntimeError):
        await units.write(half_done)
    rows = await units.read(
        partial(reads.list_messages, conversation_id=first.conversation_id, limit=10)
    )
    assert [r.text for r in rows] == ["one"]
    # The seq it had taken was rolled back with it: the next message follows without a gap.
    nxt = await _post(units, "bo", "three", first.conversation_id)
    assert nxt.seq == first.seq + 1


async def test_a_redelivered_external_id_hits_the_unique_key(units: executor.Database) -> None:
    row, _, _ = await units.write(
        partial(inbound.store_inbound, target=_target("cy"), m=_inbound("hi", external_id="m-1"))
    )
    with pytest.raises(IntegrityError):
        await units.write(
            partial(
                inbound.store_inbound, target=_target("cy"), m=_inbound("hi", external_id="m-1")
            )
        )
    dup = await units.read(
        partial(inbound.find_by_external_id, channel="api", account="default", external_id="m-1")
    )
    assert dup is not None and (dup.message_id, dup.seq) == (row.id, row.seq)


async def test_concurrent_writers_and_readers_keep_every_message_in_order(
    units: executor.Database,
) -> None:
    """Many conversations written at once while replay/history readers run beside them:
    nothing fails ("database is locked"), nothing is lost, seqs stay contiguous."""
    contacts = [f"shopper-{i}" for i in range(12)]
    firsts = {c: await _post(units, c, "0") for c in contacts}
    stop = asyncio.Event()
    done_reads = 0

    async def reader(contact: str) -> None:
        nonlocal done_reads
        cid = firsts[contact].conversation_id
        while not stop.is_set():
            rows = await units.read(partial(reads.list_messages, conversation_id=cid, limit=200))
            seqs = [r.seq for r in rows]
            assert seqs == list(range(1, len(seqs) + 1)), "a reader saw a gap"
            await units.read(partial(reads.resume_point, conversation_id=cid))
            done_reads += 1

    async def writer(contact: str) -> None:
        cid = firsts[contact].conversation_id
        for n in range(1, 25):
            await _post(units, contact, str(n), cid)

    readers = [asyncio.create_task(reader(c)) for c in contacts[:6]]
    await asyncio.gather(*(writer(c) for c in contacts))
    stop.set()
    await asyncio.gather(*readers)
    assert done_reads > 0
    for contact in contacts:
        cid = firsts[contact].conversation_id
        rows = await units.read(partial(reads.list_messages, conversation_id=cid, limit=200))
        assert [r.text for r in rows] == [str(n) for n in range(25)]
        assert [r.seq for r in rows] == list(range(1, 26))


async def test_an_answer_is_reserved_only_while_the_bot_owns_the_conversation(
    units: executor.Database,
) -> None:
    q = await _post(units, "di", "where is my order?")
    begun = await units.write(
        partial(
            answers.begin_answer,
            conversation_id=q.conversation_id,
            message_id=q.id,
            history_limit=40,
            with_inbound=True,
        )
    )
    assert isinstance(begun, answers.Answering)
    assert begun.seq == q.seq + 1 and begun.question.text == "where is my order?"
    assert begun.inbound is not None and begun.inbound.id == q.id
    # A person takes the conversation over while the bot writes: the answer is stored as
    # abandoned and the question as theirs.
    await units.write(
        lambda conn: conn.execute(
            statements.CONVERSATIONS.update()
            .where(statements.CONVERSATIONS.c.id == q.conversation_id)
            .values(owner="human")
        )
    )
    final = await units.write(
        partial(answers.finish_answer, a=_final(q, begun, "It ships today.", delivered=True))
    )
    assert final.status == MessageStatus.ABANDONED.value
    statuses = await units.read(
        lambda conn: dict(
            conn.execute(
                select(statements.MESSAGES.c.id, statements.MESSAGES.c.status).where(
                    statements.MESSAGES.c.conversation_id == q.conversation_id
                )
            ).all()
        )
    )
    assert statuses == {q.id: MessageStatus.HUMAN.value, begun.out_id: "abandoned"}
    # A new message in a human-owned conversation reserves nothing.
    q2 = await _post(units, "di", "hello?", q.conversation_id)
    again = await units.write(
        partial(
            answers.begin_answer,
            conversation_id=q.conversation_id,
            message_id=q2.id,
            history_limit=40,
            with_inbound=False,
        )
    )
    assert again == answers.NotAnswering(human_channel="api")


async def test_an_idle_conversation_gets_the_answer_reserved_with_the_message(
    units: executor.Database,
) -> None:
    prepare = inbound.Prepare(40)

    async def post(text: str, cid: int | None) -> tuple[StoredMessage, answers.Answering | None]:
        row, _, answering = await units.write(
            partial(
                inbound.store_inbound, target=_target("ed", cid), m=_inbound(text), prepare=prepare
            )
        )
        return row, answering

    first, answering = await post("hi", None)
    assert answering is not None and answering.seq == first.seq + 1
    assert answering.question.text == "hi" and answering.history == []
    # While that answer is open, the next message waits for the worker (also when the
    # history it loads is too short to show the open one).
    second, none = await post("and another thing", first.conversation_id)
    assert none is None and second.seq == first.seq + 2
    prepare = inbound.Prepare(1)
    third, none = await post("hello?", first.conversation_id)
    assert none is None and third.seq == second.seq + 1
    # The worker asking for the reserved answer gets the same one, not a second.
    again = await units.write(
        partial(
            answers.begin_answer,
            conversation_id=first.conversation_id,
            message_id=first.id,
            history_limit=40,
            with_inbound=False,
        )
    )
    assert isinstance(again, answers.Answering)
    assert (again.out_id, again.seq) == (answering.out_id, answering.seq)
    rows = await units.read(
        partial(reads.list_messages, conversation_id=first.conversation_id, limit=10)
    )
    assert [(r.seq, r.direction, r.status) for r in rows] == [
        (1, "in", "received"),
        (2, "out", "streaming"),
        (3, "in", "received"),
        (4, "in", "received"),
    ]


async def test_sqlite_writer_puts_urgent_units_first_and_commits_waiting_ones_together(
    sqlite_url: str,
) -> None:
    engine = db.create_engine(sqlite_url)
    await db.upgrade(engine)
    database = executor.for_engine(engine)
    try:
        first = await _post(database, "fay", "0")
        cid = first.conversation_id
        release = threading.Event()
        order: list[str] = []

        def blocker(conn: Connection) -> None:
            release.wait(10)  # holds the writer while the others queue up

        def unit(name: str, text: str) -> Callable[[Connection], int]:
            def run(conn: Connection) -> int:
                order.append(name)
                row, _, _ = inbound.store_inbound(conn, _target("fay", cid), _inbound(text, name))
                return row.seq

            return run

        blocked = asyncio.create_task(database.write(blocker))
        await asyncio.sleep(0.05)
        normal = [asyncio.create_task(database.write(unit(f"n{i}", str(i)))) for i in range(3)]
        # A redelivery (its external id is taken) fails alone, undoing only itself.
        dup = asyncio.create_task(database.write(unit("n0", "again")))
        urgent = asyncio.create_task(database.write(unit("u", "urgent"), urgent=True))
        await asyncio.sleep(0.05)
        release.set()
        await blocked
        seqs = await asyncio.gather(*normal)
        with pytest.raises(IntegrityError):
            await dup
        assert await urgent == 2  # ahead of the three queued before it
        assert order[0] == "u" and seqs == [3, 4, 5]
        rows = await database.read(partial(reads.list_messages, conversation_id=cid, limit=10))
        assert [r.text for r in rows] == ["0", "urgent", "0", "1", "2"]
    finally:
        await database.close()
        await engine.dispose()


async def test_a_restart_never_sends_the_bot_answer_of_a_conversation_a_person_took(
    units: executor.Database,
) -> None:
    q = await _post(units, "eve", "where is my order?")
    begun = await units.write(
        partial(
            answers.begin_answer,
            conversation_id=q.conversation_id,
            message_id=q.id,
            history_limit=40,
            with_inbound=False,
        )
    )
    assert isinstance(begun, answers.Answering)
    # Stored, not yet sent: then the process died.
    final = _final(q, begun, "It ships today.", delivered=False)
    assert (await units.write(partial(answers.finish_answer, a=final))).status == "pending"
    agent = await units.write(
        partial(agents.add_agent, name="Mia", email="mia@x.test", role="agent", password_hash=None)
    )
    await units.write(
        partial(
            handoff.move,
            conversation_id=q.conversation_id,
            action="claim",
            actor_id=agent.id,
            admin=False,
        )
    )
    found = await units.write(recovery.recover)
    assert found.undelivered == []
    got = await units.read(partial(reads.get_message, message_id=begun.out_id))
    assert got is not None and got.status == "abandoned"
