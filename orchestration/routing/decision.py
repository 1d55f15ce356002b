"""What routing decides for one message, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestration.routing.matchers import RuleHit


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    intents: tuple[str, ...]  # primary first
    confidence: float  # calibrated probability of the primary intent, 0..1
    tier: str  # "cheap" | "premium"
    escalate: bool  # bring in a person
    sentiment: str  # "positive" | "neutral" | "negative" | "angry"
    complexity: str  # "simple" | "complex"
    stage: str  # "rule" | "faq" | "classifier" | "llm": which stage decided
    faq_answer: str | None = None
    latency_ms: float = 0.0
    reasons: tuple[str, ...] = ()  # why this tier / escalation, for people reading logs

    @property
    def primary(self) -> str:
        return self.intents[0]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "intents": list(self.intents),
            "confidence": round(self.confidence, 4),
            "tier": self.tier,
            "escalate": self.escalate,
            "sentiment": self.sentiment,
            "complexity": self.complexity,
            "stage": self.stage,
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.faq_answer is not None:
            out["faq_answer"] = self.faq_answer
        if self.reasons:
            out["reasons"] = list(self.reasons)
        return out


@dataclass(slots=True)
class RoutingTrace:
    """Everything the local stages saw, for `swarmdesk route` to explain a decision."""

    normalized: str
    masked: str  # after removing denied topics ("not a complaint")
    language: str
    rule_hits: list[RuleHit] = field(default_factory=list)
    faq: str | None = None  # name of the matching FAQ entry
    faq_matched: str | None = None
    classifier: list[tuple[str, float]] = field(default_factory=list)  # whole message
    # clause, its top intent, probability, whether a rule for that intent matched it
    clauses: list[tuple[str, str, float, bool]] = field(default_factory=list)
    clause_probs: list[dict[str, float]] = field(default_factory=list)  # per clause, fused
    fused: list[tuple[str, float]] = field(default_factory=list)  # after rule evidence
    escalate_p: float = 0.0  # the model's probability that a person is needed
    premium_p: float = 0.0  # the model's probability that the premium tier is needed
    mentions: dict[str, float] = field(default_factory=dict)  # intent -> "asks about it" p
    signals: dict[str, str] = field(default_factory=dict)
    llm_text: str | None = None
    llm_error: str | None = None
