"""One whole (not streamed to anyone) call on a tier's chain: each model in turn until one
answers, with a ledger record per attempt. For the small jobs beside the answer itself:
classifying a message, summarising a conversation for a person."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestration.events import CallRecord
from orchestration.llm.registry import ModelRegistry
from orchestration.llm.types import ChatMessage, ErrorKind, LLMError


class TierFailed(LLMError):
    """Every model of the chain failed; `records` are their ledger rows."""

    def __init__(self, last: LLMError, records: list[CallRecord]) -> None:
        super().__init__(last.kind, last.detail, status=last.status)
        self.records = records


async def call_tier(
    models: ModelRegistry,
    tier: str,
    messages: Sequence[ChatMessage],
    *,
    purpose: str,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[str, list[CallRecord]]:
    """The first answer of the chain and the ledger records of every attempt; TierFailed
    when none answered."""
    records: list[CallRecord] = []
    last: LLMError = LLMError(ErrorKind.CONNECTION, f"tier '{tier}' has no models")
    for entry in models.chain(tier):
        try:
            text, stats = await entry.client.complete_chat(
                entry.model,
                messages,
                max_tokens=min(max_tokens, entry.max_tokens or max_tokens),
                temperature=0,
                extra=extra,
            )
        except LLMError as e:
            last = e
            records.append(
                CallRecord(
                    provider=entry.provider,
                    model=entry.model,
                    outcome=e.kind.value,
                    tier=tier,
                    purpose=purpose,
                    error=str(e)[:500],
                )
            )
            continue
        records.append(
            CallRecord(
                provider=entry.provider,
                model=entry.model,
                outcome="ok",
                tier=tier,
                purpose=purpose,
                first_token_ms=None if stats.first_token_s is None else stats.first_token_s * 1000,
                latency_ms=None if stats.total_s is None else stats.total_s * 1000,
                input_tokens=stats.usage.input_tokens,
                output_tokens=stats.usage.output_tokens,
                usage_estimated=stats.usage.estimated,
                cost=entry.price.cost(stats.usage),
            )
        )
        return text, records
    raise TierFailed(last, records)
