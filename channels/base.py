"""Contracts between swarmdesk's pipeline and the channel adapters (DESIGN.md, Contracts).

A channel turns platform webhooks into `InboundMessage`s and hands them to its `ChannelHost`
(implemented by the bot); it turns reply streams into what its platform allows through a
`ReplySink`. A channel knows nothing about models.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiohttp import web

# The stored rows a channel shows and addresses: part of the contract, defined once with the
# storage that builds them.
from storage.rows import ConversationRef as ConversationRef
from storage.rows import StoredMessage as StoredMessage

if TYPE_CHECKING:
    from cluster.redis import RedisParts
    from storage.executor import Database


@dataclass(frozen=True, slots=True)
class InboundMessage:
    channel: str
    account: str
    chat_id: str  # where replies go (a private chat, a group, a widget session...)
    user_id: str  # who wrote it, on the platform
    external_id: str | None  # the platform's message id: the idempotency key
    kind: str = "text"  # text, image, voice, sticker, event, ...
    text: str = ""
    attachments: list[dict[str, Any]] = field(default_factory=list)
    sent_at: datetime | None = None
    raw: dict[str, Any] | None = None
    user_name: str | None = None
    conversation_id: int | None = None  # a channel that lets the client pick one (HTTP API)
    answer: bool = True  # False: store only (an edit, an event with nothing to say)
    # Merged into the contact's attributes (the widget's verified shop identity, ...).
    contact_attributes: dict[str, Any] | None = None
    # "agent": a person wrote it on the platform itself (a WeCom servicer): stored as an
    # outgoing agent message, never answered.
    sender: Literal["contact", "agent"] = "contact"


class UnknownConversation(LookupError):
    """The client named a conversation that does not exist or is not theirs."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    message_id: int
    conversation_id: int
    contact_id: int
    seq: int
    duplicate: bool  # a redelivery: stored before, nothing new will happen


def message_event(message: StoredMessage) -> ConversationEvent:
    """The durable event that replays a stored message on a live stream."""
    kind: EventType
    if message.status == "abandoned":
        kind = "error"  # a cut answer: clients drop its partial text
    elif message.sender == "bot":
        kind = "final"
    else:
        kind = "message"
    return ConversationEvent(message.conversation_id, kind, message.seq, None, message.as_json())


# "owner" and "note" go to the agent console only (Hub.announce), never to a shopper's stream.
EventType = Literal["message", "delta", "final", "error", "typing", "owner", "note"]


@dataclass(frozen=True, slots=True)
class ConversationEvent:
    """One event on a conversation's live stream.

    Durable events (message, final, error) carry the seq of a stored message. A delta carries
    the seq reserved for the answer it belongs to and its index within that answer.
    """

    conversation_id: int
    type: EventType
    seq: int
    index: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # time.monotonic() at creation: how long it took to reach a client (metrics, benchmarks).
    at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def durable(self) -> bool:
        return self.type in ("message", "final", "error")


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[ConversationEvent]: ...

    async def get(self, timeout: float | None = None) -> ConversationEvent | None:
        """The next event, None on timeout; raises EOFError when the bus closed the stream."""
        ...

    async def ready(self) -> None:
        """Returns once events published from now on reach this subscription, whichever
        process publishes them (read the past after this, so nothing falls between)."""
        ...

    def close(self) -> None: ...


class EventBus(Protocol):
    """Live events of conversations, for channels that hold client connections."""

    def subscribe(self, conversation_id: int) -> Subscription: ...

    def inflight(self, conversation_id: int) -> tuple[int, list[str]] | None:
        """(seq, deltas so far) of the answer this process is streaming right now, if any."""
        ...

    async def answer_so_far(self, conversation_id: int) -> tuple[int, list[str]] | None:
        """(seq, deltas so far) of the answer being streamed right now by any process."""
        ...


class ChannelHost(Protocol):
    """What the pipeline offers a channel (implemented in bot/)."""

    @property
    def events(self) -> EventBus: ...

    @property
    def db(self) -> Database:
        """For state a channel keeps itself (e.g. WeCom customer-service sync cursors)."""
        ...

    async def ingest(self, message: InboundMessage) -> IngestResult: ...

    async def get_conversation(self, conversation_id: int) -> ConversationRef | None: ...

    async def list_messages(
        self,
        conversation_id: int,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
        complete_only: bool = False,
    ) -> Sequence[StoredMessage]: ...

    async def resume_point(self, conversation_id: int) -> int:
        """Highest seq below which every message is complete (nothing still streaming)."""
        ...

    async def send_message(
        self,
        conversation_id: int,
        text: str,
        *,
        sender: str = "system",
        agent_id: int | None = None,
    ) -> StoredMessage:
        """Store a message from the system or a human agent and deliver it via its channel
        (welcome texts, "I can't read voice messages yet", an agent's answer)."""
        ...

    async def request_handoff(self, conversation_id: int, reason: str, detail: str = "") -> bool:
        """Ask for a person (the shopper typed /human, a platform refuses delivery...).
        False if a person owns or was already asked for the conversation."""
        ...

    async def answer_not_delivered(self, question_id: int, detail: str) -> bool:
        """The platform says later that the bot's answer to the stored message `question_id`
        never reached the shopper: it is marked failed and a person is asked for."""
        ...

    async def platform_move(self, conversation_id: int, action: str, reason: str) -> bool:
        """The platform moved the conversation between the bot and its people ("claim": a
        servicer of the platform took it; "handback": they ended it). False if it was so."""
        ...

    async def record_edit(self, channel: str, account: str, external_id: str, text: str) -> bool:
        """The shopper edited an earlier message: update its stored text (no new answer).
        False if the original is unknown."""
        ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    max_length: int = 0  # 0: no limit
    length_unit: Literal["chars", "bytes"] = "chars"
    can_edit: bool = False
    native_drafts: bool = False
    typing: bool = False
    # Its clients read the event bus (HTTP API, widget): its sink needs no deltas, and the
    # stored answer is its delivery (a NullSink).
    event_bus_delivery: bool = False


@dataclass(slots=True)
class Delivery:
    """What the platform said about a sent message."""

    platform_message_ids: list[str] = field(default_factory=list)
    ok: bool = True
    undeliverable: bool = False  # the platform refuses for good (closed window, blocked bot)
    detail: str = ""


# Whether the bot may still send to the conversation it is answering: False once a person
# took it over. Set by the pipeline for the answering task; a sink asks right before each
# platform call (a call may wait long behind a rate limit or a Retry-After).
_may_send: ContextVar[Callable[[], bool]] = ContextVar("may_send", default=lambda: True)


def may_send() -> bool:
    return _may_send.get()()


class TakenOver(Exception):
    """A person took the conversation over: the bot's send was not made."""


def guard_sends(check: Callable[[], bool]) -> None:
    """For the rest of the current task (and tasks it starts): sinks send while `check()`."""
    _may_send.set(check)


class ReplySink(abc.ABC):
    """Turns one reply stream into platform calls. Owns throttling, splitting and retries."""

    async def typing(self) -> None:  # noqa: B027 - optional for channels without typing
        """Show that the bot is working (before the first delta)."""

    @abc.abstractmethod
    async def push(self, delta: str) -> None:
        """A piece of text; the sink decides when the shopper sees it."""

    def shown(self) -> bool:
        """Whether any pushed text may have reached the shopper (a sink that holds text
        back until a piece is sent says False until then)."""
        return True

    def retract(self) -> None:  # noqa: B027 - only for sinks whose shown() can be False
        """Forget the text pushed so far; called only while shown() is False."""

    @abc.abstractmethod
    async def finish(self, final_text: str) -> Delivery:
        """The whole answer; must reach the shopper exactly as given."""

    @abc.abstractmethod
    async def fail(self, reason: str) -> None:
        """The stream is abandoned; clean up any partial state on the platform."""


class NullSink(ReplySink):
    """For channels whose clients read the event bus (HTTP API): nothing else to do."""

    async def push(self, delta: str) -> None:
        return None

    async def finish(self, final_text: str) -> Delivery:
        return Delivery()

    async def fail(self, reason: str) -> None:
        return None


class Channel(abc.ABC):
    name: str
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def register(self, app: web.Application, host: ChannelHost) -> None:
        """Add the channel's webhook routes to the app."""

    @abc.abstractmethod
    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        """A sink for the bot's answer to `inbound` in this conversation."""

    @abc.abstractmethod
    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        """A complete message from a human agent or the system."""

    async def agent_typing(self, conversation: ConversationRef) -> None:  # noqa: B027
        """A person is writing an answer in the console: show it where the platform can
        (channels whose clients read the event bus get a typing event instead)."""

    def share(self, cluster: RedisParts) -> None:  # noqa: B027 - only with shared state
        """Several processes serve this channel (queue.backend: redis): keep what must hold
        across them (tokens, rate limits, replay caches, locks) in `cluster`'s Redis.
        Called before `register` and `start`; never called in the embedded mode."""

    async def start(self) -> None:  # noqa: B027 - most channels need no start-up work
        """Open clients, refresh tokens..."""

    async def close(self) -> None:  # noqa: B027
        """Close clients."""

    async def handed_off(self, conversation: ConversationRef, reason: str) -> None:  # noqa: B027
        """The bot handed the conversation to a person (after its last message went out): a
        platform with a reception of its own moves the chat there."""
