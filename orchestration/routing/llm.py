"""LLM classification: the prompt, the JSON verdict, and a classifier over a tier's chain.

The model is asked for exactly
`{"intents": [...], "complexity": "simple"|"complex",
  "sentiment": "positive"|"neutral"|"negative"|"angry", "needs_human": true|false}`
with `response_format: {"type": "json_object"}`. Anything else (prose, unknown labels
only, wrong types) is rejected by `parse_verdict`, and the router keeps its local decision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestration.events import CallRecord
from orchestration.llm.registry import ModelRegistry
from orchestration.llm.tier_call import TierFailed, call_tier
from orchestration.llm.types import ChatMessage, LLMError

LlmClassify = Callable[[list[ChatMessage]], Awaitable[tuple[str, CallRecord | list[CallRecord]]]]
"""Ask a model; return its text and the ledger record(s) of the attempt(s). May raise
LLMError (a `ClassifyError` carries the records of the failed attempts)."""

SENTIMENTS = ("positive", "neutral", "negative", "angry")
COMPLEXITIES = ("simple", "complex")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass(frozen=True, slots=True)
class LlmVerdict:
    intents: tuple[str, ...]
    complexity: str
    sentiment: str
    needs_human: bool


class ClassifyError(LLMError):
    """Every model of the chain failed; `records` are their ledger rows."""

    def __init__(self, last: LLMError, records: list[CallRecord]) -> None:
        super().__init__(last.kind, last.detail, status=last.status)
        self.records = records


def classify_messages(
    text: str, labels: Sequence[str], descriptions: dict[str, str]
) -> list[ChatMessage]:
    lines = [f"- {lb}: {descriptions.get(lb) or lb}" for lb in labels]
    system = (
        "You route messages that shoppers send to an online shop's customer service. "
        "Classify the shopper's message and answer with one JSON object only, exactly: "
        '{"intents": [labels, the task the shopper most needs answered first, 1 to 3], '
        '"complexity": "simple" or "complex", '
        '"sentiment": "positive", "neutral", "negative" or "angry", '
        '"needs_human": true or false}.\n'
        "Labels:\n" + "\n".join(lines) + "\n"
        "complex: several questions, disputes, defect claims, price calculations, advice. "
        "needs_human: the shopper asks for a person, is abusive or very angry, threatens "
        "legal or regulatory action, reports a safety issue or an account takeover, or says "
        "earlier attempts failed repeatedly."
    )
    return [ChatMessage("system", system), ChatMessage("user", text)]


def parse_verdict(answer: str, labels: Sequence[str]) -> LlmVerdict | None:
    """The verdict in `answer`, or None when it is not the JSON asked for."""
    try:
        data: Any = json.loads(_FENCE.sub("", answer.strip()))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    raw = data.get("intents")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return None
    known = set(labels)
    intents: list[str] = []
    for item in raw:
        if isinstance(item, str) and item.strip().lower() in known:
            label = item.strip().lower()
            if label not in intents:
                intents.append(label)
    if not intents:
        return None
    complexity = data.get("complexity", "simple")
    sentiment = data.get("sentiment", "neutral")
    needs_human = data.get("needs_human", False)
    if complexity not in COMPLEXITIES or sentiment not in SENTIMENTS:
        return None
    if not isinstance(needs_human, bool):
        return None
    return LlmVerdict(tuple(intents), complexity, sentiment, needs_human)


def registry_classifier(
    models: ModelRegistry, tier: str = "cheap", *, max_tokens: int = 120
) -> LlmClassify:
    """An LlmClassify that tries the tier's chain in order, one ledger record per attempt."""

    async def classify(
        messages: list[ChatMessage],
    ) -> tuple[str, CallRecord | list[CallRecord]]:
        try:
            text, records = await call_tier(
                models,
                tier,
                messages,
                purpose="classify",
                max_tokens=max_tokens,
                extra={"response_format": {"type": "json_object"}},
            )
        except TierFailed as e:
            raise ClassifyError(e, e.records) from e
        return text, records if len(records) > 1 else records[0]

    return classify
