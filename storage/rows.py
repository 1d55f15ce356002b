"""One type for each kind of row that leaves storage. Channels show and replay
`StoredMessage`s and address `ConversationRef`s; the storage units build them straight from
their result rows (the column lists in storage.statements follow these fields), so adding a
column to messages is the model, the migration and a field here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple


class ConversationNotFound(LookupError):
    """No such conversation, or it is not the named contact's."""


@dataclass(frozen=True, slots=True)
class ConversationRef:
    id: int
    channel: str
    account: str
    chat_id: str
    contact_id: int
    owner: str


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored message, as a channel may show or replay it."""

    id: int
    conversation_id: int
    seq: int
    direction: str
    sender: str
    kind: str
    text: str
    status: str
    created_at: datetime
    reply_to_id: int | None = None
    attachments: list[Any] = field(default_factory=list)
    external_id: str | None = None
    agent_id: int | None = None
    platform_message_ids: list[Any] = field(default_factory=list)
    raw: dict[str, Any] | None = None  # the platform payload (not shown to clients)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "seq": self.seq,
            "direction": self.direction,
            "sender": self.sender,
            "kind": self.kind,
            "text": self.text,
            "status": self.status,
            "reply_to_id": self.reply_to_id,
            "attachments": self.attachments,
            "created_at": self.created_at.isoformat(),
        }


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


class HistoryRow(NamedTuple):
    """A message as the model's context needs it."""

    id: int
    seq: int
    direction: str
    sender: str
    text: str
    status: str
    degraded: bool | None  # routing.degraded of a bot answer


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The message stored before under a redelivered external id."""

    message_id: int
    conversation_id: int
    contact_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class AgentRow:
    """A person of the shop's team (the console and the agent API)."""

    id: int
    name: str
    email: str
    role: str  # agent | admin
    active: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "role": self.role,
            "active": self.active,
        }
