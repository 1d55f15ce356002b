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
    verified: bool = False  # the shop vouched for the shopper's identity (order tools)
    degraded_answers: int = 0  # canned answers the bot gave in this conversation


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


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


ReplyEvent = Delta | Final | Escalate | CallRecord
