"""What streaming clients and channels read: a conversation, a message, pages of history,
and where a live stream may resume. Units for storage.executor."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection

from storage.models import MessageStatus
from storage.rows import ConversationRef, StoredMessage
from storage.statements import GET_CONVERSATION, GET_MESSAGE, MESSAGE_COLUMNS, RESUME_POINT, M


def get_conversation(conn: Connection, conversation_id: int) -> ConversationRef | None:
    row = conn.execute(GET_CONVERSATION, {"b_id": conversation_id}).first()
    return ConversationRef(*row) if row is not None else None


def get_message(conn: Connection, message_id: int) -> StoredMessage | None:
    row = conn.execute(GET_MESSAGE, {"b_id": message_id}).first()
    return StoredMessage(*row) if row is not None else None


def _page(complete_only: bool, direction: str) -> Any:
    q = select(*MESSAGE_COLUMNS).where(M.conversation_id == bindparam("b_id"))
    if complete_only:
        q = q.where(M.status != MessageStatus.STREAMING.value)
    if direction == "after":
        q = q.where(M.seq > bindparam("b_seq")).order_by(M.seq.asc())
    elif direction == "before":
        q = q.where(M.seq < bindparam("b_seq")).order_by(M.seq.desc())
    else:
        q = q.order_by(M.seq.desc())
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
) -> list[StoredMessage]:
    """A page of messages in seq order: after `after_seq`, before `before_seq`, or the last."""
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
    rows = [StoredMessage(*r) for r in conn.execute(_PAGES[complete_only, direction], params)]
    if after_seq is None:
        rows.reverse()
    return rows


def resume_point(conn: Connection, conversation_id: int) -> int:
    """Highest seq below which every message is complete (nothing still streaming)."""
    return int(conn.execute(RESUME_POINT, {"b_id": conversation_id}).scalar() or 0)
