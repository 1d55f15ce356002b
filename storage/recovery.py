"""What a crash or restart left behind: answers cut mid-stream, answers stored but not
confirmed by their channel, messages never answered. A unit for storage.executor."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Partitions:
    """Some of the conversations: those whose id modulo `count` is in `held` (the work
    partitions one process of several holds; bot/distributed/queue.py)."""

    count: int
    held: tuple[int, ...]

    def where(self, column: Any) -> Any:
        return (column % self.count).in_(self.held)


# Another process may be delivering a person's or the system's message right now: only one
# this old is taken for one a crash left undelivered.
STALE_DELIVERY = timedelta(seconds=60)


def recover(conn: Connection, scope: Partitions | None = None) -> Recovery:
    """Mark cut answers abandoned; list what to deliver and to answer. `scope`: only in
    these partitions (a process taking them over from one that stopped); None: all (the
    one process at its start)."""
    only = () if scope is None else (scope.where(M.conversation_id),)
    abandoned = conn.execute(
        update(MESSAGES)
        .where(M.status == MessageStatus.STREAMING.value, *only)
        .values(status=MessageStatus.ABANDONED.value, completed_at=utcnow())
        .returning(*MESSAGE_COLUMNS)
    ).all()
    pending = (M.direction == Direction.OUT.value, M.status == MessageStatus.PENDING.value)
    # The bot's answers to conversations a person took since: never sent (the bot does not
    # talk over a human), whatever a restart interrupted.
    taken = select(C.id).where(C.owner != BOT).scalar_subquery()
    conn.execute(
        update(MESSAGES)
        .where(*pending, *only, M.sender == Sender.BOT.value, M.conversation_id.in_(taken))
        .values(status=MessageStatus.ABANDONED.value)
    )
    mine: tuple[Any, ...] = ()
    if scope is not None:
        # The bot's answers in these partitions were their holder's to deliver; others' are
        # taken once surely nobody is delivering them any more.
        stale = utcnow() - STALE_DELIVERY
        mine = ((M.sender == Sender.BOT.value) | (M.completed_at < stale),)
    undelivered = conn.execute(
        select(*MESSAGE_COLUMNS).where(*pending, *only, *mine).order_by(M.conversation_id, M.seq)
    ).all()
    unanswered = unanswered_messages(conn, scope)
    return Recovery(
        sorted((StoredMessage(*r) for r in abandoned), key=lambda r: (r.conversation_id, r.seq)),
        [StoredMessage(*r) for r in undelivered],
        unanswered,
    )


def unanswered_messages(
    conn: Connection, scope: Partitions | None = None, before: datetime | None = None
) -> list[tuple[int, int]]:
    """(conversation id, message id) of the messages waiting for an answer, in order; only
    in `scope`, only those stored `before` (the sweep for work a queue lost)."""
    where = [M.direction == Direction.IN.value, M.status == MessageStatus.RECEIVED.value]
    if scope is not None:
        where.append(scope.where(M.conversation_id))
    if before is not None:
        where.append(M.created_at < before)
    rows = conn.execute(
        select(M.conversation_id, M.id).where(*where).order_by(M.conversation_id, M.seq)
    ).all()
    return [(int(c), int(m)) for c, m in rows]
