"""The conversation model shared by every channel (SQLAlchemy 2.0 declarative, typed).

Alembic migrations in migrations/ are the only source of the schema; these classes must match
them (a test autogenerates against head and expects no difference).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT on PostgreSQL, INTEGER on SQLite (only INTEGER PRIMARY KEY autoincrements there).
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # SQLite stores naive UTC; PostgreSQL keeps the zone.
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON(),
    }


class Owner(enum.StrEnum):
    """Who may answer a conversation (DESIGN.md, Conversation ownership)."""

    BOT = "bot"
    HANDOFF_REQUESTED = "handoff_requested"
    HUMAN = "human"
    RESOLVED = "resolved"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"


class Sender(enum.StrEnum):
    CONTACT = "contact"
    BOT = "bot"
    AGENT = "agent"
    SYSTEM = "system"


class MessageStatus(enum.StrEnum):
    # inbound
    RECEIVED = "received"  # stored, waiting for the worker
    ANSWERED = "answered"  # the bot's answer is stored
    HUMAN = "human"  # a human owns the conversation; no bot answer
    SKIPPED = "skipped"  # nothing to answer (an edit, an event, an unsupported kind)
    # outbound
    STREAMING = "streaming"  # the answer is being written; deltas are flowing
    PENDING = "pending"  # the final text is stored; the channel has not confirmed delivery
    SENT = "sent"  # the channel delivered it
    ABANDONED = "abandoned"  # a stream cut by a crash; replaced by a new answer
    FAILED = "failed"  # the channel could not deliver it
    UNDELIVERABLE = "undeliverable"  # the platform refuses (e.g. WeChat 48-hour window)


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("channel", "account", "external_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    account: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str | None] = mapped_column(String(255))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_contact_open", "contact_id", "owner"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    channel: Mapped[str] = mapped_column(String(32))
    account: Mapped[str] = mapped_column(String(128))
    chat_id: Mapped[str] = mapped_column(String(255))  # where replies go on the platform
    owner: Mapped[str] = mapped_column(String(24), default=Owner.BOT.value)
    # When the owner last changed: how long a conversation has waited for a person.
    owner_since: Mapped[datetime | None] = mapped_column()
    # The satisfaction question went out when it was resolved; the shopper's 1-5 answer.
    csat_asked_at: Mapped[datetime | None] = mapped_column()
    rating: Mapped[int | None] = mapped_column(Integer)
    assigned_agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    tier: Mapped[str | None] = mapped_column(String(32))  # sticky tier, set by orchestration
    last_seq: Mapped[int] = mapped_column(Integer, default=0)  # per-conversation sequence
    cost_total: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # Redelivery of the same platform message is a no-op (NULL external ids never clash).
        UniqueConstraint("channel", "account", "external_id"),
        UniqueConstraint("conversation_id", "seq"),
        Index("ix_messages_status_direction", "status", "direction"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    seq: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(32))
    account: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str | None] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(8))
    sender: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    kind: Mapped[str] = mapped_column(String(24), default="text")
    text: Mapped[str] = mapped_column(Text, default="")
    attachments: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    platform_message_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(128))
    tier: Mapped[str | None] = mapped_column(String(32))
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Float)
    first_delta_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    raw: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sent_at: Mapped[datetime | None] = mapped_column()  # platform time of an inbound message
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class LLMCall(Base):
    """One row per model attempt, including failures, hedged losers and classifications."""

    __tablename__ = "llm_calls"
    __table_args__ = (Index("ix_llm_calls_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str | None] = mapped_column(String(32))
    specialist: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32), default="reply")
    intent: Mapped[str | None] = mapped_column(String(32))
    first_token_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(24))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class HandoffEvent(Base):
    __tablename__ = "handoff_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    from_owner: Mapped[str] = mapped_column(String(24))
    to_owner: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # summary, intents, order ids...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Agent(Base):
    """A human agent of the console."""

    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    email: Mapped[str] = mapped_column(String(255), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    role: Mapped[str] = mapped_column(String(16), default="agent", server_default="agent")
    password_hash: Mapped[str | None] = mapped_column(String(255))  # argon2


class AgentCredential(Base):
    """A console session (cookie) or a personal API token of an agent; only a hash of the
    secret is stored."""

    __tablename__ = "agent_credentials"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # session | token
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    csrf_token: Mapped[str | None] = mapped_column(String(64))  # sessions only
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()


class WebhookDelivery(Base):
    """One attempt to deliver an event to a shop's webhook (the delivery log)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    event: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(1024))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConversationNote(Base):
    """An agent's internal note on a conversation: never sent to the shopper."""

    __tablename__ = "conversation_notes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WecomKfCursor(Base):
    """Where the last `kf/sync_msg` pull of a WeChat Customer Service account stopped: the
    next pull starts here, also after a restart."""

    __tablename__ = "wecom_kf_cursors"

    account: Mapped[str] = mapped_column(String(128), primary_key=True)
    open_kfid: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RoutingExample(Base):
    """A shopper's message as people labeled it: an agent took over a conversation the bot
    kept (it should have gone to a person) or corrected its intents. `swarmdesk routing
    train` learns from these."""

    __tablename__ = "routing_examples"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    text: Mapped[str] = mapped_column(Text)
    intents: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [] = not labeled
    tier: Mapped[str | None] = mapped_column(String(16))
    escalate: Mapped[bool | None] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))  # "takeover" | "label"
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KbDocument(Base):
    """A shop document in the knowledge base (knowledge/): one per (collection, source).
    Re-adding a changed file replaces its chunks and bumps `version`."""

    __tablename__ = "kb_documents"
    __table_args__ = (UniqueConstraint("collection", "source"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    collection: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(1024))  # the absolute path it was read from
    title: Mapped[str] = mapped_column(String(512))
    url: Mapped[str | None] = mapped_column(String(2048))
    kind: Mapped[str] = mapped_column(String(16))  # markdown | text | html | pdf | catalogue
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class KbChunk(Base):
    """A passage of a document: what one search hit returns. `terms` are its index terms
    (knowledge/tokenize.py), stored so a rebuild of the index needn't tokenise again."""

    __tablename__ = "kb_chunks"
    __table_args__ = (Index("ix_kb_chunks_collection", "collection"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("kb_documents.id", ondelete="CASCADE"), index=True
    )
    collection: Mapped[str] = mapped_column(String(64))
    ordinal: Mapped[int] = mapped_column(Integer)
    heading: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(String(512))  # a catalogue product's own name
    url: Mapped[str | None] = mapped_column(String(2048))  # and its own page
    terms: Mapped[str] = mapped_column(Text, default="")  # space-separated
    # knowledge.tokenize.VERSION that cut `terms` (an older one's are cut again on load).
    tokenizer: Mapped[str] = mapped_column(String(16), default="")
    version: Mapped[int] = mapped_column(Integer)
    # None is SQL NULL (not JSON null), so `embedding IS NULL` finds the chunks to embed.
    embedding: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))


class KbGeneration(Base):
    """A counter per collection, bumped in the transaction of every change to it: each
    process rebuilds its in-memory index when the number moves."""

    __tablename__ = "kb_generations"

    collection: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkFence(Base):
    """The fencing token of one work partition (queue.backend: redis): raised each time a
    process takes the partition's lease, and checked in the transaction that stores an
    answer, so a process that lost the lease (paused, cut off) can no longer store one."""

    __tablename__ = "work_fences"

    partitions: Mapped[int] = mapped_column(Integer, primary_key=True)  # queue.partitions
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    holder: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
