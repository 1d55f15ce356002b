"""Learning from people: shoppers' messages as agents labeled them, for `routing train`.

Two ways a message becomes an example:
- an agent claims a conversation the bot still owned: the bot should have handed the
  shopper's latest message to a person (`escalate: true`, intents as routing saw them);
- an agent corrects the routing of a message (agent API `…/{id}/label`).

Units for storage.executor (plain functions of a Connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection

from storage.models import RoutingExample, Sender, utcnow
from storage.statements import MESSAGES, M

EXAMPLES = cast(Table, RoutingExample.__table__)
E = EXAMPLES.c
TAKEOVER = "takeover"
LABEL = "label"


class MessageNotLabelable(LookupError):
    """No shopper message with this seq in the conversation."""


@dataclass(frozen=True, slots=True)
class Labeled:
    conversation_id: int
    seq: int
    text: str
    intents: list[str]
    tier: str | None
    escalate: bool | None


def record_takeover(conn: Connection, conversation_id: int, agent_id: int | None) -> bool:
    """The shopper's latest text message becomes an example that needed a person; False
    if there is none (nothing said yet, or only pictures)."""
    row = conn.execute(
        select(M.id, M.text, M.routing)
        .where(
            M.conversation_id == conversation_id,
            M.sender == Sender.CONTACT.value,
            M.text != "",
        )
        .order_by(M.seq.desc())
        .limit(1)
    ).first()
    if row is None:
        return False
    routing: dict[str, Any] = row.routing or {}
    intents = routing.get("intents")
    conn.execute(
        insert(EXAMPLES).values(
            conversation_id=conversation_id,
            message_id=row.id,
            text=row.text,
            intents=[i for i in intents if isinstance(i, str)] if isinstance(intents, list) else [],
            tier=None,
            escalate=True,
            source=TAKEOVER,
            agent_id=agent_id,
            created_at=utcnow(),
        )
    )
    return True


def record_label(
    conn: Connection,
    conversation_id: int,
    seq: int,
    *,
    intents: list[str],
    tier: str | None,
    escalate: bool | None,
    agent_id: int | None,
) -> Labeled:
    """An agent's routing of one shopper message. Raises MessageNotLabelable."""
    row = conn.execute(
        select(M.id, M.text).where(
            M.conversation_id == conversation_id,
            M.seq == seq,
            M.sender == Sender.CONTACT.value,
        )
    ).first()
    if row is None or not row.text:
        raise MessageNotLabelable(f"no shopper text message with seq {seq} here")
    conn.execute(
        insert(EXAMPLES).values(
            conversation_id=conversation_id,
            message_id=row.id,
            text=row.text,
            intents=intents,
            tier=tier,
            escalate=escalate,
            source=LABEL,
            agent_id=agent_id,
            created_at=utcnow(),
        )
    )
    return Labeled(conversation_id, seq, row.text, intents, tier, escalate)


def training_lines(conn: Connection) -> list[dict[str, Any]]:
    """One JSONL-ready line per labeled message (the format of `eval-routing` and `routing
    train --add`); an agent's label of a message overrides an earlier takeover of it."""
    rows = conn.execute(
        select(E.message_id, E.text, E.intents, E.tier, E.escalate, E.source, MESSAGES.c.seq)
        .join(MESSAGES, MESSAGES.c.id == E.message_id)
        .order_by(E.id)
    ).all()
    by_message: dict[int, dict[str, Any]] = {}
    for r in rows:
        line: dict[str, Any] = {"id": f"{r.source}-{r.message_id}", "text": r.text}
        line["intents"] = list(r.intents or [])
        if r.tier is not None:
            line["tier"] = r.tier
        if r.escalate is not None:
            line["escalate"] = r.escalate
        line["source"] = r.source
        earlier = by_message.get(r.message_id)
        if earlier is not None and earlier["source"] == LABEL and r.source == TAKEOVER:
            continue
        by_message[r.message_id] = line
    return list(by_message.values())
