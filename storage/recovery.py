"""What a crash or restart left behind: answers cut mid-stream, answers stored but not
confirmed by their channel, messages never answered. A unit for storage.executor."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from storage.models import Direction, MessageStatus, Sender, utcnow
from storage.rows import StoredMessage
from storage.statements import BOT, MESSAGE_COLUMNS, MESSAGES, C, M


@dataclass(slots=True)
class Recovery:
    abandoned: list[StoredMessage]  # answers cut by a crash, now marked abandoned
    undelivered: list[StoredMessage]  # final answers stored, not confirmed by their channel
    unanswered: list[tuple[int, int]]  # (conversation id, message id), in order


def recover(conn: Connection) -> Recovery:
    """Mark cut answers abandoned; list what to deliver and to answer."""
    abandoned = conn.execute(
        update(MESSAGES)
        .where(M.status == MessageStatus.STREAMING.value)
        .values(status=MessageStatus.ABANDONED.value, completed_at=utcnow())
        .returning(*MESSAGE_COLUMNS)
    ).all()
    pending = (M.direction == Direction.OUT.value, M.status == MessageStatus.PENDING.value)
    # The bot's answers to conversations a person took since: never sent (the bot does not
    # talk over a human), whatever a restart interrupted.
    taken = select(C.id).where(C.owner != BOT).scalar_subquery()
    conn.execute(
        update(MESSAGES)
        .where(*pending, M.sender == Sender.BOT.value, M.conversation_id.in_(taken))
        .values(status=MessageStatus.ABANDONED.value)
    )
    undelivered = conn.execute(
        select(*MESSAGE_COLUMNS).where(*pending).order_by(M.conversation_id, M.seq)
    ).all()
    unanswered = conn.execute(
        select(M.conversation_id, M.id)
        .where(M.direction == Direction.IN.value, M.status == MessageStatus.RECEIVED.value)
        .order_by(M.conversation_id, M.seq)
    ).all()
    return Recovery(
        sorted((StoredMessage(*r) for r in abandoned), key=lambda r: (r.conversation_id, r.seq)),
        [StoredMessage(*r) for r in undelivered],
        [(int(c), int(m)) for c, m in unanswered],
    )
