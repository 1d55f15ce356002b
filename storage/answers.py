"""The bot's answer to a stored message: reserve it (a STREAMING row at the next seq) with
the history the model needs, store the final text with its model calls, record what the
platform said on delivery; and messages the system or a person sends. Units for
storage.executor (plain functions of a `Connection`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection

from storage import fences, pg_turns
from storage.fences import Fence
from storage.handoff import request_handoff
from storage.models import Direction, MessageStatus, Sender, utcnow
from storage.reads import get_message
from storage.rows import (
    ConversationNotFound,
    ConversationRef,
    HistoryRow,
    NewMessage,
    StoredMessage,
)
from storage.statements import (
    ADD_COST,
    BOT,
    BOT_CONVERSATION,
    CONTACT_ATTRIBUTES,
    CONVERSATION_CHANNEL,
    CONVERSATION_COLUMNS,
    CONVERSATIONS,
    HISTORY,
    INSERT_CALLS,
    MESSAGES,
    RESERVE_ANSWER,
    RESERVED,
    SET_MESSAGE,
    C,
    M,
    insert_message,
    set_status,
)


@dataclass(slots=True)
class Answering:
    """The answer to an inbound message is reserved (a STREAMING row at `seq`)."""

    conversation: ConversationRef
    tier: str | None
    cost_total: float
    question: HistoryRow  # the inbound message as stored now
    history: list[HistoryRow]  # complete messages before it, oldest first
    out_id: int
    seq: int
    out_created_at: datetime
    contact_attributes: dict[str, Any] | None  # who the shopper is (verified or not)
    inbound: StoredMessage | None  # only when asked for


@dataclass(slots=True)
class NotAnswering:
    """Nothing to answer (answered already, or gone), or a person owns the conversation
    (`human_channel` set: the inbound message is marked as theirs)."""

    human_channel: str | None = None


def history(conn: Connection, conversation_id: int, message_id: int, limit: int) -> Sequence[Any]:
    """The complete messages up to `message_id`, newest first (HISTORY's columns)."""
    return conn.execute(
        HISTORY,
        {"b_conversation": conversation_id, "b_message": message_id, "b_limit": limit},
    ).all()


def begin_answer(
    conn: Connection,
    conversation_id: int,
    message_id: int,
    history_limit: int,
    with_inbound: bool,
    fence: Fence | None = None,
) -> Answering | NotAnswering:
    """Check the inbound message still waits for an answer and the bot owns the
    conversation; load the history up to it (`history_limit` messages with it); reserve
    the answer's seq (STREAMING), or take the reservation made when it was stored. The
    contact's attributes come along, the whole inbound row `with_inbound`. `fence`: the
    work partition's token the turn runs under (raises FenceLost if another process took
    the partition: a process that does not know yet must not take a seq for an answer the
    new holder gives after the answers to earlier messages)."""
    if fence is not None:
        fences.check(conn, fence)
    rows = history(conn, conversation_id, message_id, history_limit)
    if not rows or rows[0][0] != message_id or rows[0][5] != MessageStatus.RECEIVED.value:
        return NotAnswering()  # answered already (a recovered duplicate of the queue entry)
    inbound = get_message(conn, message_id) if with_inbound else None
    return reserve(conn, conversation_id, message_id, rows, inbound=inbound, reuse=True)


def reserve(
    conn: Connection,
    conversation_id: int,
    message_id: int,
    rows: Sequence[Any],
    *,
    inbound: StoredMessage | None,
    reuse: bool,
) -> Answering | NotAnswering:
    """Reserve the answer to `message_id`, whose history up to it is `rows` (newest first).
    `reuse`: an answer reserved earlier is taken, not a second one (the caller may not know
    whether store_inbound reserved one); a person owning the conversation gets the message
    (without `reuse`: nothing happens, the worker will see to it)."""
    now = utcnow()
    reserved = conn.execute(RESERVED, {"b_message": message_id}).first() if reuse else None
    conv: Sequence[Any] | None
    if reserved is None:
        conv = conn.execute(RESERVE_ANSWER, {"b_id": conversation_id, "updated_at": now}).first()
    else:
        found = conn.execute(BOT_CONVERSATION, {"b_id": conversation_id}).first()
        conv = None if found is None else (reserved[1], *found)
    if conv is None:
        if not reuse:
            return NotAnswering()
        channel = conn.execute(CONVERSATION_CHANNEL, {"b_id": conversation_id}).scalar()
        if channel is None:
            return NotAnswering()
        set_status(conn, message_id, MessageStatus.HUMAN.value)
        if reserved is not None:
            set_status(conn, reserved[0], MessageStatus.ABANDONED.value)
        return NotAnswering(human_channel=channel)
    seq, channel, account, chat_id, contact_id, tier, cost_total = conv
    if reserved is None:
        out = NewMessage(
            Direction.OUT.value,
            Sender.BOT.value,
            MessageStatus.STREAMING.value,
            reply_to_id=message_id,
        )
        out_id = insert_message(conn, conversation_id, seq, channel, account, out, now).id
        created_at = now
    else:
        out_id, created_at = reserved[0], reserved[2]
    attributes = conn.execute(CONTACT_ATTRIBUTES, {"b_id": contact_id}).scalar()
    turns = [HistoryRow._make(r) for r in reversed(rows)]
    question = turns.pop()
    return Answering(
        ConversationRef(conversation_id, channel, account, chat_id, contact_id, BOT),
        tier,
        float(cost_total or 0.0),
        question,
        turns,
        out_id,
        seq,
        created_at,
        attributes,
        inbound,
    )


@dataclass(slots=True)
class FinalAnswer:
    conversation_id: int
    inbound_id: int
    out_id: int
    out_seq: int
    out_created_at: datetime
    text: str
    calls: Sequence[dict[str, Any]]  # llm_calls rows (without conversation and message)
    model: str | None
    tier: str | None
    first_delta_ms: float | None
    latency_ms: float
    routing: dict[str, Any] | None
    # The channel delivers nothing beyond the stored answer (its clients read the event
    # bus): record it as sent right away instead of in a second transaction.
    delivered: bool
    # (reason, card): the answer asks for a person. In the same transaction, so no message
    # that arrives after this answer is taken by the bot instead of waiting for them.
    handoff: tuple[str, dict[str, Any] | None] | None = None
    # The work partition's lease the answer was written under (several processes): checked
    # first, so an answer of a process that lost the lease is never stored (FenceLost).
    fence: Fence | None = None


def finish_answer(conn: Connection, a: FinalAnswer) -> StoredMessage:
    """Store the final answer and its model calls (and its handoff request). If a person
    took the conversation over while the bot was writing, the answer is stored as abandoned
    instead (the bot never talks over a human): the returned row's status says which."""
    now = utcnow()
    if a.handoff is None and conn.dialect.name == "postgresql":
        # One statement instead of five, the fence's check in it (storage/pg_turns.py).
        return _answer_row(a, pg_turns.finish(conn, a, now))
    if a.fence is not None:
        fences.check(conn, a.fence)
    if a.calls:
        conn.execute(
            INSERT_CALLS,
            [
                {
                    **c,
                    "conversation_id": a.conversation_id,
                    "message_id": a.inbound_id,
                    "created_at": now,
                }
                for c in a.calls
            ],
        )
    cost = sum(float(c["cost"]) for c in a.calls)
    owner = conn.execute(
        ADD_COST, {"b_id": a.conversation_id, "b_cost": cost, "b_tier": a.tier}
    ).scalar_one()
    out: dict[str, Any]
    if owner != BOT:
        out = {"status": MessageStatus.ABANDONED.value, "text": a.text, "completed_at": now}
        inbound: dict[str, Any] = {"status": MessageStatus.HUMAN.value}
    else:
        out = {
            "text": a.text,
            "status": MessageStatus.SENT.value if a.delivered else MessageStatus.PENDING.value,
            "model": a.model,
            "tier": a.tier,
            "input_tokens": sum(int(c["input_tokens"]) for c in a.calls),
            "output_tokens": sum(int(c["output_tokens"]) for c in a.calls),
            "cost": cost,
            "first_delta_ms": a.first_delta_ms,
            "latency_ms": a.latency_ms,
            "routing": a.routing,
            "completed_at": now,
        }
        inbound = {"status": MessageStatus.ANSWERED.value, "routing": a.routing}
        if a.handoff is not None:
            request_handoff(conn, a.conversation_id, *a.handoff)
    conn.execute(SET_MESSAGE, {"b_id": a.out_id, **out})
    conn.execute(SET_MESSAGE, {"b_id": a.inbound_id, **inbound})
    return _answer_row(a, out["status"])


def _answer_row(a: FinalAnswer, status: str) -> StoredMessage:
    return StoredMessage(
        a.out_id,
        a.conversation_id,
        a.out_seq,
        Direction.OUT.value,
        Sender.BOT.value,
        "text",
        a.text,
        status,
        a.out_created_at,
        reply_to_id=a.inbound_id,
    )


def record_delivery(
    conn: Connection, message_id: int, status: str, platform_message_ids: list[Any]
) -> None:
    conn.execute(
        SET_MESSAGE,
        {"b_id": message_id, "status": status, "platform_message_ids": platform_message_ids},
    )


def add_outbound(
    conn: Connection, conversation_id: int, m: NewMessage
) -> tuple[ConversationRef, StoredMessage]:
    """Store a message from the system or an agent (raises ConversationNotFound)."""
    now = utcnow()
    conv = conn.execute(
        update(CONVERSATIONS)
        .where(C.id == conversation_id)
        .values(last_seq=C.last_seq + 1, updated_at=now)
        .returning(C.last_seq, *CONVERSATION_COLUMNS)
    ).first()
    if conv is None:
        raise ConversationNotFound(conversation_id)
    seq, *columns = conv
    ref = ConversationRef(*columns)
    return ref, insert_message(conn, conversation_id, seq, ref.channel, ref.account, m, now)


def answer_failed(conn: Connection, question_id: int) -> int | None:
    """The platform reported later that the bot's answer to `question_id` did not reach the
    shopper: it is marked failed. Its conversation, or None if there is no such answer."""
    return conn.execute(
        update(MESSAGES)
        .where(
            M.reply_to_id == question_id,
            M.sender == Sender.BOT.value,
            M.status == MessageStatus.SENT.value,
        )
        .values(status=MessageStatus.FAILED.value)
        .returning(M.conversation_id)
    ).scalar()
