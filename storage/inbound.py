"""Storing what a shopper sends: the message (and its contact and conversation when they are
new), optionally the answer's reservation in the same transaction; redelivery lookups and
edits. Units for storage.executor (plain functions of a `Connection`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage import pg_turns
from storage.answers import Answering, history, reserve
from storage.handoff import RESOLVED, record_event
from storage.models import MessageStatus, utcnow
from storage.rows import (
    ConversationNotFound,
    ConversationRef,
    Duplicate,
    NewMessage,
    StoredMessage,
)
from storage.statements import (
    ALLOCATE_SEQ_FOR_CONTACT,
    BOT,
    BUSY,
    CONTACT_AND_OPEN_CONVERSATION,
    CONTACTS,
    CONVERSATIONS,
    LATEST_RESOLVED,
    MESSAGE_COLUMNS,
    MESSAGES,
    NAMED_CONVERSATION,
    SET_CONTACT,
    C,
    M,
    allocate_seq,
    insert_message,
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


def store_inbound(
    conn: Connection, target: InboundTarget, m: NewMessage, prepare: Prepare | None = None
) -> tuple[StoredMessage, int, Answering | None]:
    """Store a shopper's message: (the stored row, the contact id, the reserved answer).

    With `prepare`, the answer is reserved in the same transaction (what
    `answers.begin_answer` would do) when the bot owns the conversation and nothing else of
    it is waiting or being answered: the worker then starts the model call without a
    database round trip first.

    Raises ConversationNotFound for a named conversation that isn't the contact's, and
    IntegrityError when the external id is stored already (a redelivery: see
    `find_by_external_id`); the caller's transaction rolls back either way.
    """
    if target.conversation_id is not None and conn.dialect.name == "postgresql":
        return _store_named_pg(conn, target, target.conversation_id, m, prepare)
    stored, contact_id = _store(conn, target, m)
    if prepare is None or stored.status != MessageStatus.RECEIVED.value:
        return stored, contact_id, None
    cid = stored.conversation_id
    rows = history(conn, cid, stored.id, prepare.history_limit)
    # An earlier message still waiting (or being answered: its question waits until then)
    # shows in the history, unless the history is cut off by the limit: then ask.
    if any(r[5] == MessageStatus.RECEIVED.value for r in rows[1:]) or (
        len(rows) >= prepare.history_limit
        and conn.execute(BUSY, {"b_conversation": cid, "b_message": stored.id}).first()
    ):
        return stored, contact_id, None
    answering = reserve(conn, cid, stored.id, rows, inbound=stored, reuse=False)
    return stored, contact_id, answering if isinstance(answering, Answering) else None


def _store_named_pg(
    conn: Connection,
    target: InboundTarget,
    conversation_id: int,
    m: NewMessage,
    prepare: Prepare | None,
) -> tuple[StoredMessage, int, Answering | None]:
    """store_inbound for a named conversation on PostgreSQL, in two statements
    (storage/pg_turns.py says why)."""
    now = utcnow()
    seq, contact_id, owner, csat_asked_at, channel, account, chat_id, tier, cost, attributes = (
        pg_turns.allocate(
            conn, conversation_id, target.channel, target.account, target.user_id, now
        )
    )
    contact_id = int(contact_id)
    changed = False
    if target.contact_attributes:
        # The latest says who the contact is now (e.g. verified or anonymous).
        merged = {**(attributes or {}), **target.contact_attributes}
        changed, attributes = merged != attributes, merged
    if owner == RESOLVED:
        m = after_resolved(conn, conversation_id, csat_asked_at, m, now)
    reserve_with = (
        prepare.history_limit
        if prepare is not None and m.status == MessageStatus.RECEIVED.value
        else None
    )
    place = (conversation_id, channel, account, contact_id)
    stored, reserved = pg_turns.store(
        conn, place, int(seq), m, now, attributes, changed, reserve_with
    )
    if reserved is None:
        return stored, contact_id, None
    ref = ConversationRef(conversation_id, channel, account, chat_id, contact_id, BOT)
    answering = Answering(
        ref,
        tier,
        float(cost or 0.0),
        reserved.question,
        reserved.history,
        reserved.out_id,
        reserved.seq,
        now,
        attributes,
        stored,
    )
    return stored, contact_id, answering


def _store(conn: Connection, target: InboundTarget, m: NewMessage) -> tuple[StoredMessage, int]:
    now = utcnow()
    attributes: dict[str, Any] | None
    who = {"b_channel": target.channel, "b_account": target.account, "b_user": target.user_id}
    if target.conversation_id is not None and not target.contact_attributes:
        taken = conn.execute(
            ALLOCATE_SEQ_FOR_CONTACT, {"b_id": target.conversation_id, "updated_at": now, **who}
        ).first()
        if taken is None:
            raise ConversationNotFound(target.conversation_id)
        seq, contact_id, owner, csat_asked_at = taken
        if owner == RESOLVED:
            m = after_resolved(conn, target.conversation_id, csat_asked_at, m, now)
        stored = insert_message(
            conn, target.conversation_id, seq, target.channel, target.account, m, now
        )
        return stored, int(contact_id)
    if target.conversation_id is not None:
        row = conn.execute(NAMED_CONVERSATION, {"b_id": target.conversation_id, **who}).first()
        if row is None:
            raise ConversationNotFound(target.conversation_id)
        conversation_id, (contact_id, attributes, owner, csat_asked_at) = (
            target.conversation_id,
            row,
        )
        if owner == RESOLVED:
            m = after_resolved(conn, conversation_id, csat_asked_at, m, now)
    else:
        who["b_chat"] = target.chat_id
        contact_id, attributes, open_id = _contact_and_open_conversation(conn, target, who, now)
        if open_id is not None:
            conversation_id = open_id
        else:
            resolved = conn.execute(LATEST_RESOLVED, {**who, "b_contact": contact_id}).first()
            if resolved is not None:
                conversation_id = resolved[0]
                m = after_resolved(conn, conversation_id, resolved[1], m, now)
            else:
                conversation_id = _open(conn, target, contact_id, now)
    if target.contact_attributes:
        # The latest says who the contact is now (e.g. verified or anonymous).
        merged = {**(attributes or {}), **target.contact_attributes}
        conn.execute(SET_CONTACT, {"b_id": contact_id, "attributes": merged})
    seq = allocate_seq(conn, conversation_id, now)
    stored = insert_message(conn, conversation_id, seq, target.channel, target.account, m, now)
    return stored, int(contact_id)


def after_resolved(
    conn: Connection,
    conversation_id: int,
    csat_asked_at: datetime | None,
    m: NewMessage,
    now: datetime,
) -> NewMessage:
    """The shopper writes to a resolved conversation: a rating (1-5) answers the
    satisfaction question and leaves it resolved (nothing to answer); anything else opens it
    again for the bot (DESIGN.md, Conversation ownership)."""
    rating = satisfaction_rating(m.text) if csat_asked_at is not None else None
    if rating is not None:
        conn.execute(
            update(CONVERSATIONS)
            .where(C.id == conversation_id)
            .values(rating=rating, csat_asked_at=None, updated_at=now)
        )
        return replace(m, status=MessageStatus.SKIPPED.value)
    conn.execute(
        update(CONVERSATIONS)
        .where(C.id == conversation_id)
        .values(owner=BOT, assigned_agent_id=None, owner_since=now, csat_asked_at=None)
    )
    record_event(conn, conversation_id, RESOLVED, BOT, "shopper_wrote", None, None)
    return m


_RATING = re.compile(r"^\s*([1-5])\s*(?:分|星|stars?|/\s*5)?\s*[.!。！]?\s*$", re.IGNORECASE)


def satisfaction_rating(text: str) -> int | None:
    """1-5 from an answer to the satisfaction question ("4", "5分", "3 stars"), else None."""
    found = _RATING.match(text)
    return int(found.group(1)) if found else None


def _contact_and_open_conversation(
    conn: Connection, target: InboundTarget, who: dict[str, Any], now: datetime
) -> tuple[int, dict[str, Any] | None, int | None]:
    """(contact id, its attributes, its latest unresolved conversation in this chat)."""
    row = conn.execute(CONTACT_AND_OPEN_CONVERSATION, who).first()
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
    row = conn.execute(CONTACT_AND_OPEN_CONVERSATION, who).one()
    return int(row[0]), row[1], row[2]


def _open(conn: Connection, target: InboundTarget, contact_id: int, now: datetime) -> int:
    key = conn.execute(
        insert(CONVERSATIONS).values(
            contact_id=contact_id,
            channel=target.channel,
            account=target.account,
            chat_id=target.chat_id,
            owner=BOT,
            last_seq=0,
            cost_total=0.0,
            created_at=now,
            updated_at=now,
        )
    ).inserted_primary_key
    assert key is not None
    return int(key[0])


def find_by_external_id(
    conn: Connection, channel: str, account: str, external_id: str
) -> Duplicate | None:
    row = conn.execute(
        select(M.id, M.conversation_id, C.contact_id, M.seq)
        .join_from(MESSAGES, CONVERSATIONS, C.id == M.conversation_id)
        .where(M.channel == channel, M.account == account, M.external_id == external_id)
    ).first()
    return Duplicate(*row) if row is not None else None


def record_edit(
    conn: Connection, channel: str, account: str, external_id: str, text: str
) -> StoredMessage | None:
    """The shopper edited an earlier message: its new text, the old one kept in `raw`."""
    row = conn.execute(
        select(M.id, M.text, M.raw).where(
            M.channel == channel, M.account == account, M.external_id == external_id
        )
    ).first()
    if row is None:
        return None
    message_id, previous, raw = row
    raw = dict(raw or {})
    raw["edits"] = [*raw.get("edits", []), {"previous_text": previous, "at": utcnow().isoformat()}]
    updated = conn.execute(
        update(MESSAGES)
        .where(M.id == message_id)
        .values(text=text, raw=raw)
        .returning(*MESSAGE_COLUMNS)
    ).one()
    return StoredMessage(*updated)
