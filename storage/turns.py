"""The database side of a message's life in Core statements: store the shopper's message,
reserve the answer, store the final, record the delivery; plus the reads streaming clients
make. Each function is a unit of work for storage.executor (a plain function of a
`Connection`; the caller decides the transaction).

These run for every message, so they use as few statements as the job needs (an UPDATE ...
RETURNING reads what it changes; the inbound message and the history come in one query) and
no ORM: its unit-of-work bookkeeping cost more than the statements themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Float, String, Table, bindparam, case, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage.models import (
    Contact,
    Conversation,
    Direction,
    HandoffEvent,
    LLMCall,
    Message,
    MessageStatus,
    Owner,
    Sender,
    utcnow,
)

MESSAGES = cast(Table, Message.__table__)
CONVERSATIONS = cast(Table, Conversation.__table__)
CONTACTS = cast(Table, Contact.__table__)
LLM_CALLS = cast(Table, LLMCall.__table__)
HANDOFFS = cast(Table, HandoffEvent.__table__)

_M, _C, _K = MESSAGES.c, CONVERSATIONS.c, CONTACTS.c
_BOT = Owner.BOT.value

# What a channel may show of a message (channels.base.StoredMessage), in this order.
MESSAGE_COLUMNS = (
    _M.id,
    _M.conversation_id,
    _M.seq,
    _M.direction,
    _M.sender,
    _M.kind,
    _M.text,
    _M.status,
    _M.created_at,
    _M.reply_to_id,
    _M.attachments,
    _M.external_id,
    _M.agent_id,
    _M.platform_message_ids,
    _M.raw,
)
CONVERSATION_COLUMNS = (_C.id, _C.channel, _C.account, _C.chat_id, _C.contact_id, _C.owner)

# The statements of the hot path are built once: building a statement with its values
# inline cost more than running it. Values come as parameters; for INSERT and UPDATE, the
# keys named after columns fill the VALUES / SET clause (bound names start with b_).
_INSERT_MESSAGE = insert(MESSAGES)
_ALLOCATE_SEQ = (
    update(CONVERSATIONS)
    .where(_C.id == bindparam("b_id"))
    .values(last_seq=_C.last_seq + 1)
    .returning(_C.last_seq)
)
_NAMED_CONVERSATION = (
    select(_C.contact_id, _K.attributes)
    .join_from(CONVERSATIONS, CONTACTS, _K.id == _C.contact_id)
    .where(
        _C.id == bindparam("b_id"),
        _K.channel == bindparam("b_channel"),
        _K.account == bindparam("b_account"),
        _K.external_id == bindparam("b_user"),
    )
)
_CONTACT_AND_OPEN_CONVERSATION = select(
    _K.id,
    _K.attributes,
    select(_C.id)
    .where(
        _C.contact_id == _K.id,
        _C.channel == _K.channel,
        _C.account == _K.account,
        _C.chat_id == bindparam("b_chat"),
        _C.owner != Owner.RESOLVED.value,
    )
    .order_by(_C.id.desc())
    .limit(1)
    .scalar_subquery(),
).where(
    _K.channel == bindparam("b_channel"),
    _K.account == bindparam("b_account"),
    _K.external_id == bindparam("b_user"),
)
# A message to a named conversation of the contact: check and take a seq at once.
_ALLOCATE_SEQ_FOR_CONTACT = (
    update(CONVERSATIONS)
    .where(
        _C.id == bindparam("b_id"),
        _C.contact_id
        == select(_K.id)
        .where(
            _K.channel == bindparam("b_channel"),
            _K.account == bindparam("b_account"),
            _K.external_id == bindparam("b_user"),
        )
        .scalar_subquery(),
    )
    .values(last_seq=_C.last_seq + 1)
    .returning(_C.last_seq, _C.contact_id)
)
_SET_CONTACT = update(CONTACTS).where(_K.id == bindparam("b_id"))
_HISTORY = (
    select(
        _M.id,
        _M.seq,
        _M.direction,
        _M.sender,
        _M.text,
        _M.status,
        # Only this of the routing JSON matters here: the database extracts it.
        _M.routing["degraded"].as_boolean(),
    )
    .where(
        _M.conversation_id == bindparam("b_conversation"),
        _M.seq <= select(_M.seq).where(_M.id == bindparam("b_message")).scalar_subquery(),
        _M.status != MessageStatus.STREAMING.value,
        _M.status != MessageStatus.ABANDONED.value,
    )
    .order_by(_M.seq.desc())
    .limit(bindparam("b_limit"))
)
_RESERVE_ANSWER = (
    update(CONVERSATIONS)
    .where(_C.id == bindparam("b_id"), _C.owner == _BOT)
    .values(last_seq=_C.last_seq + 1)
    .returning(
        _C.last_seq, _C.channel, _C.account, _C.chat_id, _C.contact_id, _C.tier, _C.cost_total
    )
)
_CONVERSATION_CHANNEL = select(_C.channel).where(_C.id == bindparam("b_id"))
# Anything else of the conversation still to answer, or being answered right now?
_BUSY = (
    select(_M.id)
    .where(
        _M.conversation_id == bindparam("b_conversation"),
        (_M.status == MessageStatus.RECEIVED.value) | (_M.status == MessageStatus.STREAMING.value),
        _M.id != bindparam("b_message"),
    )
    .limit(1)
)
# An answer reserved for the message already (when it was stored: see store_inbound).
_RESERVED = select(_M.id, _M.seq, _M.created_at).where(
    _M.reply_to_id == bindparam("b_message"),
    _M.status == MessageStatus.STREAMING.value,
    _M.direction == Direction.OUT.value,
)
_BOT_CONVERSATION = select(
    _C.channel, _C.account, _C.chat_id, _C.contact_id, _C.tier, _C.cost_total
).where(_C.id == bindparam("b_id"), _C.owner == _BOT)
_CONTACT_ATTRIBUTES = select(_K.attributes).where(_K.id == bindparam("b_id"))
_SET_MESSAGE = update(MESSAGES).where(_M.id == bindparam("b_id"))
_ADD_COST = (
    update(CONVERSATIONS)
    .where(_C.id == bindparam("b_id"))
    .values(
        cost_total=func.coalesce(_C.cost_total, 0.0) + bindparam("b_cost", type_=Float),
        # The sticky tier moves only while the bot owns the conversation.
        tier=case(
            (_C.owner == _BOT, func.coalesce(bindparam("b_tier", type_=String), _C.tier)),
            else_=_C.tier,
        ),
    )
    .returning(_C.owner)
)
_INSERT_CALLS = insert(LLM_CALLS)
_GET_CONVERSATION = select(*CONVERSATION_COLUMNS).where(_C.id == bindparam("b_id"))
_GET_MESSAGE = select(*MESSAGE_COLUMNS).where(_M.id == bindparam("b_id"))
_RESUME_POINT = select(
    func.coalesce(
        select(func.min(_M.seq) - 1)
        .where(
            _M.conversation_id == bindparam("b_id"),
            _M.status == MessageStatus.STREAMING.value,
        )
        .scalar_subquery(),
        select(_C.last_seq).where(_C.id == bindparam("b_id")).scalar_subquery(),
        0,
    )
)


class ConversationNotFound(LookupError):
    """No such conversation, or it is not the named contact's."""


@dataclass(slots=True)
class NewMessage:
    """A message to store; `seq` comes from the conversation."""

    direction: str
    sender: str
    status: str
    text: str = ""
    kind: str = "text"
    external_id: str | None = None
    attachments: list[Any] | None = None
    raw: dict[str, Any] | None = None
    sent_at: datetime | None = None
    reply_to_id: int | None = None
    agent_id: int | None = None
    completed_at: datetime | None = None


@dataclass(slots=True)
class StoredRow:
    """A stored message with the columns of MESSAGE_COLUMNS."""

    id: int
    conversation_id: int
    seq: int
    direction: str
    sender: str
    kind: str
    text: str
    status: str
    created_at: datetime
    reply_to_id: int | None
    attachments: list[Any]
    external_id: str | None
    agent_id: int | None
    platform_message_ids: list[Any]
    raw: dict[str, Any] | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> StoredRow:
        return cls(*row)


@dataclass(slots=True)
class ConversationRow:
    id: int
    channel: str
    account: str
    chat_id: str
    contact_id: int
    owner: str


# -- writing ---------------------------------------------------------------------------------


def _allocate_seq(conn: Connection, conversation_id: int, now: datetime) -> int:
    """Next per-conversation sequence number (atomic: the UPDATE takes the row lock)."""
    seq = conn.execute(_ALLOCATE_SEQ, {"b_id": conversation_id, "updated_at": now}).scalar()
    if seq is None:
        raise ConversationNotFound(conversation_id)
    return int(seq)


def _insert_message(
    conn: Connection,
    conversation_id: int,
    seq: int,
    channel: str,
    account: str,
    m: NewMessage,
    now: datetime,
) -> StoredRow:
    attachments = m.attachments or []
    result = conn.execute(
        _INSERT_MESSAGE,
        {
            "conversation_id": conversation_id,
            "seq": seq,
            "channel": channel,
            "account": account,
            "external_id": m.external_id,
            "direction": m.direction,
            "sender": m.sender,
            "agent_id": m.agent_id,
            "kind": m.kind,
            "text": m.text,
            "attachments": attachments,
            "status": m.status,
            "reply_to_id": m.reply_to_id,
            "platform_message_ids": [],
            "raw": m.raw,
            "sent_at": m.sent_at,
            "created_at": now,
            "completed_at": m.completed_at,
        },
    )
    (message_id,) = result.inserted_primary_key or (None,)
    assert message_id is not None
    return StoredRow(
        int(message_id),
        conversation_id,
        seq,
        m.direction,
        m.sender,
        m.kind,
        m.text,
        m.status,
        now,
        m.reply_to_id,
        attachments,
        m.external_id,
        m.agent_id,
        [],
        m.raw,
    )


@dataclass(slots=True)
class InboundTarget:
    """Where an inbound message goes: the contact, and the conversation if the client named
    one (else the contact's open conversation in this chat, or a new one)."""

    channel: str
    account: str
    chat_id: str
    user_id: str
    user_name: str | None
    conversation_id: int | None
    contact_attributes: dict[str, Any] | None


@dataclass(slots=True)
class Prepare:
    """Reserve the answer right away when nothing else of the conversation is waiting."""

    history_limit: int
    trusted_channels: frozenset[str]


def store_inbound(
    conn: Connection, target: InboundTarget, m: NewMessage, prepare: Prepare | None = None
) -> tuple[StoredRow, int, Answering | None]:
    """Store a shopper's message: (the stored row, the contact id, the reserved answer).

    With `prepare`, the answer is reserved in the same transaction (what `begin_answer`
    would do) when the bot owns the conversation and nothing else of it is waiting or being
    answered: the worker then starts the model call without a database round trip first.

    Raises ConversationNotFound for a named conversation that isn't the contact's, and
    IntegrityError when the external id is stored already (a redelivery: see
    `find_by_external_id`); the caller's transaction rolls back either way.
    """
    stored, contact_id = _store_inbound(conn, target, m)
    if prepare is None:
        return stored, contact_id, None
    cid = stored.conversation_id
    rows = _history(conn, cid, stored.id, prepare.history_limit)
    # An earlier message still waiting (or being answered: its question waits until then)
    # shows in the history, unless the history is cut off by the limit: then ask.
    if any(r[5] == MessageStatus.RECEIVED.value for r in rows[1:]) or (
        len(rows) >= prepare.history_limit
        and conn.execute(_BUSY, {"b_conversation": cid, "b_message": stored.id}).first()
    ):
        return stored, contact_id, None
    answering = _reserve(
        conn, cid, stored.id, rows, prepare.trusted_channels, inbound=stored, reuse=False
    )
    return stored, contact_id, answering if isinstance(answering, Answering) else None


def _store_inbound(conn: Connection, target: InboundTarget, m: NewMessage) -> tuple[StoredRow, int]:
    now = utcnow()
    attributes: dict[str, Any] | None
    who = {"b_channel": target.channel, "b_account": target.account, "b_user": target.user_id}
    if target.conversation_id is not None and not target.contact_attributes:
        taken = conn.execute(
            _ALLOCATE_SEQ_FOR_CONTACT, {"b_id": target.conversation_id, "updated_at": now, **who}
        ).first()
        if taken is None:
            raise ConversationNotFound(target.conversation_id)
        seq, contact_id = taken
        stored = _insert_message(
            conn, target.conversation_id, seq, target.channel, target.account, m, now
        )
        return stored, int(contact_id)
    if target.conversation_id is not None:
        row = conn.execute(_NAMED_CONVERSATION, {"b_id": target.conversation_id, **who}).first()
        if row is None:
            raise ConversationNotFound(target.conversation_id)
        conversation_id, (contact_id, attributes) = target.conversation_id, row
    else:
        who["b_chat"] = target.chat_id
        contact_id, attributes, open_id = _contact_and_open_conversation(conn, target, who, now)
        conversation_id = open_id if open_id is not None else _open(conn, target, contact_id, now)
    if target.contact_attributes:
        # The latest says who the contact is now (e.g. verified or anonymous).
        merged = {**(attributes or {}), **target.contact_attributes}
        conn.execute(_SET_CONTACT, {"b_id": contact_id, "attributes": merged})
    seq = _allocate_seq(conn, conversation_id, now)
    stored = _insert_message(conn, conversation_id, seq, target.channel, target.account, m, now)
    return stored, int(contact_id)


def _contact_and_open_conversation(
    conn: Connection, target: InboundTarget, who: dict[str, Any], now: datetime
) -> tuple[int, dict[str, Any] | None, int | None]:
    """(contact id, its attributes, its latest unresolved conversation in this chat)."""
    row = conn.execute(_CONTACT_AND_OPEN_CONVERSATION, who).first()
    if row is not None:
        return int(row[0]), row[1], row[2]
    # A new contact. Another replica may create it at the same moment (PostgreSQL): the
    # savepoint keeps our transaction usable, and we take theirs.
    try:
        with conn.begin_nested():
            key = conn.execute(
                insert(CONTACTS).values(
                    channel=target.channel,
                    account=target.account,
                    external_id=target.user_id,
                    display_name=target.user_name,
                    attributes={},
                    created_at=now,
                )
            ).inserted_primary_key
        assert key is not None
        return int(key[0]), {}, None
    except IntegrityError:
        pass
    row = conn.execute(_CONTACT_AND_OPEN_CONVERSATION, who).one()
    return int(row[0]), row[1], row[2]


def _open(conn: Connection, target: InboundTarget, contact_id: int, now: datetime) -> int:
    key = conn.execute(
        insert(CONVERSATIONS).values(
            contact_id=contact_id,
            channel=target.channel,
            account=target.account,
            chat_id=target.chat_id,
            owner=_BOT,
            last_seq=0,
            cost_total=0.0,
            created_at=now,
            updated_at=now,
        )
    ).inserted_primary_key
    assert key is not None
    return int(key[0])


@dataclass(slots=True)
class Duplicate:
    message_id: int
    conversation_id: int
    contact_id: int
    seq: int


def find_by_external_id(
    conn: Connection, channel: str, account: str, external_id: str
) -> Duplicate | None:
    row = conn.execute(
        select(_M.id, _M.conversation_id, _C.contact_id, _M.seq)
        .join_from(MESSAGES, CONVERSATIONS, _C.id == _M.conversation_id)
        .where(_M.channel == channel, _M.account == account, _M.external_id == external_id)
    ).first()
    return Duplicate(*row) if row is not None else None


class HistoryRow(NamedTuple):
    id: int
    seq: int
    direction: str
    sender: str
    text: str
    status: str
    degraded: bool | None  # routing.degraded of a bot answer


@dataclass(slots=True)
class Answering:
    """The answer to an inbound message is reserved (a STREAMING row at `seq`)."""

    conversation: ConversationRow
    tier: str | None
    cost_total: float
    question: HistoryRow  # the inbound message as stored now
    history: list[HistoryRow]  # complete messages before it, oldest first
    out_id: int
    seq: int
    out_created_at: datetime
    contact_attributes: dict[str, Any] | None  # only for channels not trusted
    inbound: StoredRow | None  # only when asked for


@dataclass(slots=True)
class NotAnswering:
    """Nothing to answer (answered already, or gone), or a person owns the conversation
    (`human_channel` set: the inbound message is marked as theirs)."""

    human_channel: str | None = None


def _history(conn: Connection, conversation_id: int, message_id: int, limit: int) -> Sequence[Any]:
    return conn.execute(
        _HISTORY,
        {"b_conversation": conversation_id, "b_message": message_id, "b_limit": limit},
    ).all()


def begin_answer(
    conn: Connection,
    conversation_id: int,
    message_id: int,
    history_limit: int,
    trusted_channels: frozenset[str],
    with_inbound: bool,
) -> Answering | NotAnswering:
    """Check the inbound message still waits for an answer and the bot owns the
    conversation; load the history up to it (`history_limit` messages with it); reserve
    the answer's seq (STREAMING), or take the reservation made when it was stored. The
    contact's attributes come along for channels not in `trusted_channels`, the whole
    inbound row `with_inbound`."""
    rows = _history(conn, conversation_id, message_id, history_limit)
    if not rows or rows[0][0] != message_id or rows[0][5] != MessageStatus.RECEIVED.value:
        return NotAnswering()  # answered already (a recovered duplicate of the queue entry)
    inbound = get_message(conn, message_id) if with_inbound else None
    return _reserve(
        conn, conversation_id, message_id, rows, trusted_channels, inbound=inbound, reuse=True
    )


def _reserve(
    conn: Connection,
    conversation_id: int,
    message_id: int,
    rows: Sequence[Any],
    trusted_channels: frozenset[str],
    *,
    inbound: StoredRow | None,
    reuse: bool,
) -> Answering | NotAnswering:
    """Reserve the answer to `message_id`, whose history up to it is `rows` (newest first).
    `reuse`: an answer reserved earlier is taken, not a second one (the caller may not know
    whether store_inbound reserved one); a person owning the conversation gets the message
    (without `reuse`: nothing happens, the worker will see to it)."""
    now = utcnow()
    reserved = conn.execute(_RESERVED, {"b_message": message_id}).first() if reuse else None
    conv: Sequence[Any] | None
    if reserved is None:
        conv = conn.execute(_RESERVE_ANSWER, {"b_id": conversation_id, "updated_at": now}).first()
    else:
        found = conn.execute(_BOT_CONVERSATION, {"b_id": conversation_id}).first()
        conv = None if found is None else (reserved[1], *found)
    if conv is None:
        if not reuse:
            return NotAnswering()
        channel = conn.execute(_CONVERSATION_CHANNEL, {"b_id": conversation_id}).scalar()
        if channel is None:
            return NotAnswering()
        _set_status(conn, message_id, MessageStatus.HUMAN.value)
        if reserved is not None:
            _set_status(conn, reserved[0], MessageStatus.ABANDONED.value)
        return NotAnswering(human_channel=channel)
    seq, channel, account, chat_id, contact_id, tier, cost_total = conv
    if reserved is None:
        out_id, created_at = (
            _insert_message(
                conn,
                conversation_id,
                seq,
                channel,
                account,
                NewMessage(
                    Direction.OUT.value,
                    Sender.BOT.value,
                    MessageStatus.STREAMING.value,
                    reply_to_id=message_id,
                ),
                now,
            ).id,
            now,
        )
    else:
        out_id, created_at = reserved[0], reserved[2]
    attributes = None
    if channel not in trusted_channels:
        attributes = conn.execute(_CONTACT_ATTRIBUTES, {"b_id": contact_id}).scalar()
    history = [HistoryRow._make(r) for r in reversed(rows)]
    question = history.pop()
    return Answering(
        ConversationRow(conversation_id, channel, account, chat_id, contact_id, _BOT),
        tier,
        float(cost_total or 0.0),
        question,
        history,
        out_id,
        seq,
        created_at,
        attributes,
        inbound,
    )


def _set_status(conn: Connection, message_id: int, status: str) -> None:
    conn.execute(_SET_MESSAGE, {"b_id": message_id, "status": status})


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


def finish_answer(conn: Connection, a: FinalAnswer) -> StoredRow:
    """Store the final answer and its model calls (and its handoff request). If a person
    took the conversation over while the bot was writing, the answer is stored as abandoned
    instead (the bot never talks over a human): the returned row's status says which."""
    now = utcnow()
    if a.calls:
        conn.execute(
            _INSERT_CALLS,
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
        _ADD_COST, {"b_id": a.conversation_id, "b_cost": cost, "b_tier": a.tier}
    ).scalar_one()
    out: dict[str, Any]
    if owner != _BOT:
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
    conn.execute(_SET_MESSAGE, {"b_id": a.out_id, **out})
    conn.execute(_SET_MESSAGE, {"b_id": a.inbound_id, **inbound})
    return StoredRow(
        a.out_id,
        a.conversation_id,
        a.out_seq,
        Direction.OUT.value,
        Sender.BOT.value,
        "text",
        a.text,
        out["status"],
        a.out_created_at,
        a.inbound_id,
        [],
        None,
        None,
        [],
        None,
    )


def record_delivery(
    conn: Connection, message_id: int, status: str, platform_message_ids: list[Any]
) -> None:
    conn.execute(
        _SET_MESSAGE,
        {"b_id": message_id, "status": status, "platform_message_ids": platform_message_ids},
    )


def add_outbound(
    conn: Connection, conversation_id: int, m: NewMessage
) -> tuple[ConversationRow, StoredRow]:
    """Store a message from the system or an agent (raises ConversationNotFound)."""
    now = utcnow()
    conv = conn.execute(
        update(CONVERSATIONS)
        .where(_C.id == conversation_id)
        .values(last_seq=_C.last_seq + 1, updated_at=now)
        .returning(_C.last_seq, *CONVERSATION_COLUMNS)
    ).first()
    if conv is None:
        raise ConversationNotFound(conversation_id)
    seq, *fields = conv
    ref = ConversationRow(*fields)
    return ref, _insert_message(conn, conversation_id, seq, ref.channel, ref.account, m, now)


def request_handoff(
    conn: Connection, conversation_id: int, reason: str, card: dict[str, Any] | None
) -> bool:
    """Bot -> handoff_requested; False if the bot doesn't own the conversation."""
    changed = conn.execute(
        update(CONVERSATIONS)
        .where(_C.id == conversation_id, _C.owner == _BOT)
        .values(owner=Owner.HANDOFF_REQUESTED.value, updated_at=utcnow())
        .returning(_C.id)
    ).first()
    if changed is None:
        return False
    conn.execute(
        insert(HANDOFFS).values(
            conversation_id=conversation_id,
            from_owner=_BOT,
            to_owner=Owner.HANDOFF_REQUESTED.value,
            reason=reason,
            card=card,
            created_at=utcnow(),
        )
    )
    return True


def record_edit(
    conn: Connection, channel: str, account: str, external_id: str, text: str
) -> StoredRow | None:
    row = conn.execute(
        select(_M.id, _M.text, _M.raw).where(
            _M.channel == channel, _M.account == account, _M.external_id == external_id
        )
    ).first()
    if row is None:
        return None
    message_id, previous, raw = row
    raw = dict(raw or {})
    raw["edits"] = [*raw.get("edits", []), {"previous_text": previous, "at": utcnow().isoformat()}]
    updated = conn.execute(
        update(MESSAGES)
        .where(_M.id == message_id)
        .values(text=text, raw=raw)
        .returning(*MESSAGE_COLUMNS)
    ).one()
    return StoredRow.of(updated)


@dataclass(slots=True)
class Recovery:
    abandoned: list[StoredRow]  # answers cut by a crash, now marked abandoned
    undelivered: list[StoredRow]  # final answers stored but not confirmed by their channel
    unanswered: list[tuple[int, int]]  # (conversation id, message id), in order


def recover(conn: Connection) -> Recovery:
    """After a crash: mark cut answers abandoned; list what to deliver and to answer."""
    abandoned = conn.execute(
        update(MESSAGES)
        .where(_M.status == MessageStatus.STREAMING.value)
        .values(status=MessageStatus.ABANDONED.value, completed_at=utcnow())
        .returning(*MESSAGE_COLUMNS)
    ).all()
    undelivered = conn.execute(
        select(*MESSAGE_COLUMNS)
        .where(
            _M.direction == Direction.OUT.value,
            _M.status == MessageStatus.PENDING.value,
        )
        .order_by(_M.conversation_id, _M.seq)
    ).all()
    unanswered = conn.execute(
        select(_M.conversation_id, _M.id)
        .where(
            _M.direction == Direction.IN.value,
            _M.status == MessageStatus.RECEIVED.value,
        )
        .order_by(_M.conversation_id, _M.seq)
    ).all()
    return Recovery(
        sorted((StoredRow.of(r) for r in abandoned), key=lambda r: (r.conversation_id, r.seq)),
        [StoredRow.of(r) for r in undelivered],
        [(int(c), int(m)) for c, m in unanswered],
    )


# -- reading ---------------------------------------------------------------------------------


def get_conversation(conn: Connection, conversation_id: int) -> ConversationRow | None:
    row = conn.execute(_GET_CONVERSATION, {"b_id": conversation_id}).first()
    return ConversationRow(*row) if row is not None else None


def get_message(conn: Connection, message_id: int) -> StoredRow | None:
    row = conn.execute(_GET_MESSAGE, {"b_id": message_id}).first()
    return StoredRow.of(row) if row is not None else None


def _page(complete_only: bool, direction: str) -> Any:
    q = select(*MESSAGE_COLUMNS).where(_M.conversation_id == bindparam("b_id"))
    if complete_only:
        q = q.where(_M.status != MessageStatus.STREAMING.value)
    if direction == "after":
        q = q.where(_M.seq > bindparam("b_seq")).order_by(_M.seq.asc())
    elif direction == "before":
        q = q.where(_M.seq < bindparam("b_seq")).order_by(_M.seq.desc())
    else:
        q = q.order_by(_M.seq.desc())
    return q.limit(bindparam("b_limit"))


_PAGES = {
    (complete, direction): _page(complete, direction)
    for complete in (False, True)
    for direction in ("after", "before", "last")
}


def list_messages(
    conn: Connection,
    conversation_id: int,
    *,
    after_seq: int | None = None,
    before_seq: int | None = None,
    limit: int = 50,
    complete_only: bool = False,
) -> list[StoredRow]:
    direction, seq = (
        ("after", after_seq)
        if after_seq is not None
        else ("before", before_seq)
        if before_seq is not None
        else ("last", None)
    )
    params: dict[str, Any] = {"b_id": conversation_id, "b_limit": limit}
    if seq is not None:
        params["b_seq"] = seq
    rows = [StoredRow.of(r) for r in conn.execute(_PAGES[complete_only, direction], params)]
    if after_seq is None:
        rows.reverse()
    return rows


def resume_point(conn: Connection, conversation_id: int) -> int:
    """Highest seq below which every message is complete (nothing still streaming)."""
    return int(conn.execute(_RESUME_POINT, {"b_id": conversation_id}).scalar() or 0)
