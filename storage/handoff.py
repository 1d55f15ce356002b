"""Who owns a conversation: the moves between the bot and people (DESIGN.md, Conversation
ownership), each stored as a handoff event. Units for storage.executor."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.engine import Connection

from storage.models import Owner, utcnow
from storage.statements import BOT, CONVERSATIONS, HANDOFFS, C


def request_handoff(
    conn: Connection, conversation_id: int, reason: str, card: dict[str, Any] | None
) -> bool:
    """Bot -> handoff_requested; False if the bot doesn't own the conversation."""
    changed = conn.execute(
        update(CONVERSATIONS)
        .where(C.id == conversation_id, C.owner == BOT)
        .values(owner=Owner.HANDOFF_REQUESTED.value, updated_at=utcnow())
        .returning(C.id)
    ).first()
    if changed is None:
        return False
    conn.execute(
        insert(HANDOFFS).values(
            conversation_id=conversation_id,
            from_owner=BOT,
            to_owner=Owner.HANDOFF_REQUESTED.value,
            reason=reason,
            card=card,
            created_at=utcnow(),
        )
    )
    return True
