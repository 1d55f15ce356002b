"""What `Orchestrator.reply` yields (DESIGN.md, Data flow step 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the conversation as the models see it."""

    role: str  # "user" | "assistant"
    text: str
    sender: str = "contact"  # contact | bot | agent | system


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    id: int
    channel: str
    tier: str | None = None  # sticky tier of earlier turns
    spent: float = 0.0  # money spent on models in this conversation so far
    # The shopper's id in the shop, when the shop vouched for it (order tools need it).
    shop_user_id: str | None = None
    degraded_answers: int = 0  # canned answers the bot gave in this conversation
    # A draft for a person who owns the conversation: answer the question itself, even
    # where the shopper asked for a person (they have one now).
    drafting: bool = False
    # The channel account the conversation came in on (a widget site, a bot, an official
    # account): which collection of the shop's documents it reads.
    account: str = ""


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Retract:
    """Every delta of this answer so far is withdrawn: none of it reached the shopper, and a
    fresh answer follows. Sent only after `Visibility` said nothing was seen."""


@dataclass(slots=True)
class Visibility:
    """Whether the shopper may have seen any of the answer streamed so far.

    The consumer of the reply stream keeps `seen` (and `sending`, while a push is under
    way) current. Before orchestration withdraws a failed attempt it sets `withdrawing`:
    from then on the consumer drops that attempt's deltas still on their way, until the
    `Retract` event arrives.
    """

    seen: bool = False
    sending: bool = False
    withdrawing: bool = False

    def withdraw(self) -> bool:
        """Start withdrawing the answer so far; False if the shopper may have seen it."""
        if self.seen or self.sending:
            return False
        self.withdrawing = True
        return True


@dataclass(frozen=True, slots=True)
class Final:
    text: str
    provider: str | None = None
    model: str | None = None
    tier: str | None = None
    degraded: bool = False  # canned text instead of a model answer
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    routing: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Escalate:
    reason: str
    detail: str = ""
    card: dict[str, Any] = field(default_factory=dict)  # summary, intents, order ids, sentiment


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One model attempt, for the llm_calls ledger."""

    provider: str
    model: str
    outcome: str  # ok | rate_limit | server_error | timeout | ... | cancelled
    tier: str | None = None
    specialist: str | None = None
    purpose: str = "reply"
    intent: str | None = None
    first_token_ms: float | None = None
    latency_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    usage_estimated: bool = False
    cost: float = 0.0
    error: str | None = None


ReplyEvent = Delta | Retract | Final | Escalate | CallRecord
