"""The handoff card's summary by the cheap tier: what a person taking over needs to know,
in two sentences (the card keeps its template summary when no model answers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from orchestration.events import CallRecord, Turn
from orchestration.llm.registry import ModelRegistry
from orchestration.llm.tier_call import TierFailed, call_tier
from orchestration.llm.types import ChatMessage

Summarise = Callable[[Sequence[Turn]], Awaitable[tuple[str | None, list[CallRecord]]]]
_PROMPT = (
    "A customer-service conversation is being handed to a human colleague. In at most two "
    "sentences, in the language the shopper writes in, say what the shopper wants, which "
    "orders or products are involved, and what the bot already told them. No greeting."
)
_TURNS = 20
_CHARS = 300
_WHO = {"contact": "Shopper", "bot": "Bot", "agent": "Agent", "system": "System"}


def transcript(turns: Sequence[Turn]) -> str:
    lines = []
    for t in turns[-_TURNS:]:
        who = _WHO.get(t.sender or "", "Shopper" if t.role == "user" else "Bot")
        text = t.text if len(t.text) <= _CHARS else t.text[:_CHARS] + "…"
        lines.append(f"{who}: {text}")
    return "\n".join(lines)


def registry_summariser(
    models: ModelRegistry, tier: str = "cheap", max_tokens: int = 160
) -> Summarise:
    async def summarise(turns: Sequence[Turn]) -> tuple[str | None, list[CallRecord]]:
        messages = [ChatMessage("system", _PROMPT), ChatMessage("user", transcript(turns))]
        try:
            text, records = await call_tier(
                models, tier, messages, purpose="summary", max_tokens=max_tokens
            )
        except TierFailed as e:
            return None, e.records
        return text.strip()[:600] or None, records

    return summarise
