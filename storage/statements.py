"""The tables as Core objects and the statements of the hot path, built once: building a
statement with its values inline cost more than running it. Values come as parameters; for
INSERT and UPDATE the keys named after columns fill the VALUES / SET clause (bound names
start with b_). Plus the few writes that several units share."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import cast

from sqlalchemy import Float, String, Table, bindparam, case, func, insert, select, update
from sqlalchemy.engine import Connection

from storage.models import (
    Contact,
    Conversation,
    Direction,
    HandoffEvent,
    LLMCall,
    Message,
    MessageStatus,
    Owner,
)
from storage.rows import ConversationNotFound, ConversationRef, NewMessage, StoredMessage

MESSAGES = cast(Table, Message.__table__)
CONVERSATIONS = cast(Table, Conversation.__table__)
CONTACTS = cast(Table, Contact.__table__)
LLM_CALLS = cast(Table, LLMCall.__table__)
HANDOFFS = cast(Table, HandoffEvent.__table__)

M, C, K = MESSAGES.c, CONVERSATIONS.c, CONTACTS.c
BOT = Owner.BOT.value

# The row types' fields name their columns, in order: a result row builds the type directly.
MESSAGE_COLUMNS = tuple(M[f.name] for f in fields(StoredMessage))
CONVERSATION_COLUMNS = tuple(C[f.name] for f in fields(ConversationRef))

INSERT_MESSAGE = insert(MESSAGES)
SET_MESSAGE = update(MESSAGES).where(M.id == bindparam("b_id"))
GET_MESSAGE = select(*MESSAGE_COLUMNS).where(M.id == bindparam("b_id"))
GET_CONVERSATION = select(*CONVERSATION_COLUMNS).where(C.id == bindparam("b_id"))
ALLOCATE_SEQ = (
    update(CONVERSATIONS)
    .where(C.id == bindparam("b_id"))
    .values(last_seq=C.last_seq + 1)
    .returning(C.last_seq)
)
_CONTACT_BY_PLATFORM_ID = (
    K.channel == bindparam("b_channel"),
    K.account == bindparam("b_account"),
    K.external_id == bindparam("b_user"),
)
NAMED_CONVERSATION = (
    select(C.contact_id, K.attributes, C.owner, C.csat_asked_at)
    .join_from(CONVERSATIONS, CONTACTS, K.id == C.contact_id)
    .where(C.id == bindparam("b_id"), *_CONTACT_BY_PLATFORM_ID)
)
CONTACT_AND_OPEN_CONVERSATION = select(
    K.id,
    K.attributes,
    select(C.id)
    .where(
        C.contact_id == K.id,
        C.channel == K.channel,
        C.account == K.account,
        C.chat_id == bindparam("b_chat"),
        C.owner != Owner.RESOLVED.value,
    )
    .order_by(C.id.desc())
    .limit(1)
    .scalar_subquery(),
).where(*_CONTACT_BY_PLATFORM_ID)
# The contact's latest resolved conversation in a chat (a new message opens it again).
LATEST_RESOLVED = (
    select(C.id, C.csat_asked_at)
    .where(
        C.contact_id == bindparam("b_contact"),
        C.channel == bindparam("b_channel"),
        C.account == bindparam("b_account"),
        C.chat_id == bindparam("b_chat"),
        C.owner == Owner.RESOLVED.value,
    )
    .order_by(C.id.desc())
    .limit(1)
)
# A message to a named conversation of the contact: check and take a seq at once.
ALLOCATE_SEQ_FOR_CONTACT = (
    update(CONVERSATIONS)
    .where(
        C.id == bindparam("b_id"),
        C.contact_id == select(K.id).where(*_CONTACT_BY_PLATFORM_ID).scalar_subquery(),
    )
    .values(last_seq=C.last_seq + 1)
    .returning(C.last_seq, C.contact_id, C.owner, C.csat_asked_at)
)
SET_CONTACT = update(CONTACTS).where(K.id == bindparam("b_id"))
CONTACT_ATTRIBUTES = select(K.attributes).where(K.id == bindparam("b_id"))
# A message as the model's context needs it (storage.rows.HistoryRow).
HISTORY_COLUMNS = (
    M.id,
    M.seq,
    M.direction,
    M.sender,
    M.text,
    M.status,
    # Only this of the routing JSON matters here: the database extracts it.
    M.routing["degraded"].as_boolean(),
)
HISTORY = (
    select(*HISTORY_COLUMNS)
    .where(
        M.conversation_id == bindparam("b_conversation"),
        M.seq <= select(M.seq).where(M.id == bindparam("b_message")).scalar_subquery(),
        M.status != MessageStatus.STREAMING.value,
        M.status != MessageStatus.ABANDONED.value,
    )
    .order_by(M.seq.desc())
    .limit(bindparam("b_limit"))
)
RESERVE_ANSWER = (
    update(CONVERSATIONS)
    .where(C.id == bindparam("b_id"), C.owner == BOT)
    .values(last_seq=C.last_seq + 1)
    .returning(C.last_seq, C.channel, C.account, C.chat_id, C.contact_id, C.tier, C.cost_total)
)
CONVERSATION_CHANNEL = select(C.channel).where(C.id == bindparam("b_id"))
# Anything else of the conversation still to answer, or being answered right now?
BUSY = (
    select(M.id)
    .where(
        M.conversation_id == bindparam("b_conversation"),
        (M.status == MessageStatus.RECEIVED.value) | (M.status == MessageStatus.STREAMING.value),
        M.id != bindparam("b_message"),
    )
    .limit(1)
)
# An answer reserved for the message already (when it was stored: see inbound.store_inbound).
RESERVED = select(M.id, M.seq, M.created_at).where(
    M.reply_to_id == bindparam("b_message"),
    M.status == MessageStatus.STREAMING.value,
    M.direction == Direction.OUT.value,
)
BOT_CONVERSATION = select(
    C.channel, C.account, C.chat_id, C.contact_id, C.tier, C.cost_total
).where(C.id == bindparam("b_id"), C.owner == BOT)
ADD_COST = (
    update(CONVERSATIONS)
    .where(C.id == bindparam("b_id"))
    .values(
        cost_total=func.coalesce(C.cost_total, 0.0) + bindparam("b_cost", type_=Float),
        # The sticky tier moves only while the bot owns the conversation.
        tier=case(
            (C.owner == BOT, func.coalesce(bindparam("b_tier", type_=String), C.tier)),
            else_=C.tier,
        ),
    )
    .returning(C.owner)
)
INSERT_CALLS = insert(LLM_CALLS)
RESUME_POINT = select(
    func.coalesce(
        select(func.min(M.seq) - 1)
        .where(M.conversation_id == bindparam("b_id"), M.status == MessageStatus.STREAMING.value)
        .scalar_subquery(),
        select(C.last_seq).where(C.id == bindparam("b_id")).scalar_subquery(),
        0,
    )
)


def allocate_seq(conn: Connection, conversation_id: int, now: datetime) -> int:
    """Next per-conversation sequence number (atomic: the UPDATE takes the row lock)."""
    seq = conn.execute(ALLOCATE_SEQ, {"b_id": conversation_id, "updated_at": now}).scalar()
    if seq is None:
        raise ConversationNotFound(conversation_id)
    return int(seq)


def insert_message(
    conn: Connection,
    conversation_id: int,
    seq: int,
    channel: str,
    account: str,
    m: NewMessage,
    now: datetime,
) -> StoredMessage:
    attachments = m.attachments or []
    result = conn.execute(
        INSERT_MESSAGE,
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
    return StoredMessage(
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


def set_status(conn: Connection, message_id: int, status: str) -> None:
    conn.execute(SET_MESSAGE, {"b_id": message_id, "status": status})
