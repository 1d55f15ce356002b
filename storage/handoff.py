"""Who owns a conversation: the moves between the bot and people (DESIGN.md, Conversation
ownership), each stored as a handoff event (who, when, why). Units for storage.executor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from storage.models import Owner, utcnow
from storage.routing_examples import record_takeover
from storage.rows import ConversationNotFound, ConversationRef
from storage.statements import BOT, CONVERSATION_COLUMNS, CONVERSATIONS, HANDOFFS, LLM_CALLS, C

HUMAN = Owner.HUMAN.value
WAITING = Owner.HANDOFF_REQUESTED.value
RESOLVED = Owner.RESOLVED.value


def request_handoff(
    conn: Connection, conversation_id: int, reason: str, card: dict[str, Any] | None
) -> bool:
    """Bot -> handoff_requested; False if the bot doesn't own the conversation."""
    now = utcnow()
    changed = conn.execute(
        update(CONVERSATIONS)
        .where(C.id == conversation_id, C.owner == BOT)
        .values(owner=WAITING, owner_since=now, updated_at=now)
        .returning(C.id)
    ).first()
    if changed is None:
        return False
    record_event(conn, conversation_id, BOT, WAITING, reason, None, card)
    return True


class OwnerRefused(Exception):
    """The agent may not make this move: `code` says why (the agent API's error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Moved:
    conversation: ConversationRef  # as it is now
    from_owner: str
    changed: bool  # False: it was so already


# The moves an agent makes: (the owner it leaves the conversation with, who is assigned:
# "actor", "target" or None).
MOVES: dict[str, tuple[str, str | None]] = {
    "claim": (HUMAN, "actor"),
    "assign": (HUMAN, "target"),
    "unassign": (WAITING, None),
    "resolve": (RESOLVED, "keep"),
    "handback": (Owner.BOT.value, None),
}


def move(
    conn: Connection,
    conversation_id: int,
    action: str,
    *,
    actor_id: int | None,
    admin: bool,
    target_id: int | None = None,
    reason: str | None = None,
) -> Moved:
    """An agent's move (MOVES). An agent acts on a conversation nobody has or that is
    theirs; an admin on anybody's; the platform (`actor_id` None: a WeCom servicer took or
    ended the session) on any. Raises OwnerRefused or ConversationNotFound."""
    admin = admin or actor_id is None
    to_owner, assignee = MOVES[action]
    row = conn.execute(
        select(C.owner, C.assigned_agent_id).where(C.id == conversation_id).with_for_update()
    ).first()
    if row is None:
        raise ConversationNotFound(conversation_id)
    owner, assigned = row
    if owner == RESOLVED and action in ("claim", "assign", "unassign"):
        raise OwnerRefused("resolved", "the conversation is resolved")
    theirs = assigned is not None and assigned != actor_id and owner in (HUMAN, RESOLVED)
    if theirs and not admin:
        raise OwnerRefused(
            "owned_by_other" if action == "claim" else "not_allowed",
            "another agent has this conversation",
        )
    new_assigned = {"actor": actor_id, "target": target_id, None: None, "keep": assigned}[assignee]
    if owner == to_owner and assigned == new_assigned:
        return Moved(_ref(conn, conversation_id), owner, False)
    now = utcnow()
    conn.execute(
        update(CONVERSATIONS)
        .where(C.id == conversation_id)
        .values(owner=to_owner, assigned_agent_id=new_assigned, owner_since=now, updated_at=now)
    )
    record_event(conn, conversation_id, owner, to_owner, reason or action, actor_id, None)
    if owner == BOT and to_owner == HUMAN:
        # A person took over what the bot kept: routing should have escalated (issue 15).
        record_takeover(conn, conversation_id, actor_id)
    return Moved(_ref(conn, conversation_id), owner, True)


def _ref(conn: Connection, conversation_id: int) -> ConversationRef:
    row = conn.execute(select(*CONVERSATION_COLUMNS).where(C.id == conversation_id)).one()
    return ConversationRef(*row)


def record_event(
    conn: Connection,
    conversation_id: int,
    from_owner: str,
    to_owner: str,
    reason: str,
    agent_id: int | None,
    card: dict[str, Any] | None,
) -> None:
    conn.execute(
        insert(HANDOFFS).values(
            conversation_id=conversation_id,
            from_owner=from_owner,
            to_owner=to_owner,
            reason=reason,
            agent_id=agent_id,
            card=card,
            created_at=utcnow(),
        )
    )


def set_summary(
    conn: Connection, conversation_id: int, summary: str | None, calls: Sequence[dict[str, Any]]
) -> bool:
    """A model's summary on the card of the conversation's latest handoff request (the
    template one stays as `summary_template`), with the calls it took in the ledger (also
    when no model answered: `summary` None)."""
    if calls:
        now = utcnow()
        conn.execute(
            insert(LLM_CALLS),
            [{**c, "conversation_id": conversation_id, "created_at": now} for c in calls],
        )
    row = conn.execute(
        select(HANDOFFS.c.id, HANDOFFS.c.card)
        .where(HANDOFFS.c.conversation_id == conversation_id, HANDOFFS.c.to_owner == WAITING)
        .order_by(HANDOFFS.c.id.desc())
        .limit(1)
    ).first()
    if row is None or summary is None:
        return False
    event_id, card = row
    card = dict(card or {})
    card["summary_template"] = card.get("summary")
    card.update(summary=summary, summary_by="model")
    conn.execute(update(HANDOFFS).where(HANDOFFS.c.id == event_id).values(card=card))
    return True
