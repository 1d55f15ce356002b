"""The orchestration entry point: `Orchestrator.reply` turns a shopper's message into a stream
of reply events. It never raises for model failures: a failed model falls back to the next of
its chain, then to a canned answer plus an escalation (DESIGN.md, Contracts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import structlog

from orchestration.config import ReplySettings
from orchestration.events import (
    CallRecord,
    ConversationInfo,
    Delta,
    Escalate,
    Final,
    ReplyEvent,
    Turn,
)
from orchestration.llm.client import ChatStream
from orchestration.llm.registry import ModelEntry, ModelRegistry
from orchestration.llm.tokens import trim_history
from orchestration.llm.types import ChatMessage, ErrorKind, LLMError

log = structlog.get_logger(__name__)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class Orchestrator:
    def __init__(self, models: ModelRegistry, settings: ReplySettings) -> None:
        self.models = models
        self.settings = settings

    def _prompt(self, history: Sequence[Turn], message: Turn) -> list[ChatMessage]:
        msgs = [ChatMessage("system", self.settings.system_prompt)]
        for t in history:
            if t.sender == "agent":
                # The model must know a human said this, not itself.
                msgs.append(ChatMessage("assistant", f"[human agent] {t.text}"))
            else:
                msgs.append(ChatMessage(t.role, t.text))
        msgs.append(ChatMessage("user", message.text))
        return trim_history(msgs, self.settings.history_token_budget)

    async def reply(
        self, conversation: ConversationInfo, history: Sequence[Turn], message: Turn
    ) -> AsyncIterator[ReplyEvent]:
        tier = conversation.tier or "cheap"
        prompt = self._prompt(history, message)
        deadline = time.monotonic() + self.settings.turn_deadline_seconds
        sent = ""  # text the shopper may already have seen
        for entry in self.models.chain(tier):
            if time.monotonic() >= deadline:
                break
            messages = prompt
            if sent:
                # Continue after a cut: the next model sees what was sent and goes on.
                messages = [*prompt, ChatMessage("assistant", sent)]
            attempt = _Attempt(entry, tier)
            try:
                async for delta in attempt.run(messages, self.settings, deadline):
                    sent += delta
                    yield Delta(delta)
            except LLMError as e:
                yield attempt.record(e.kind.value, str(e))
                log.warning(
                    "model_failed", model=entry.ref, kind=e.kind.value, conversation=conversation.id
                )
                if e.kind is ErrorKind.RATE_LIMIT and e.retry_after:
                    # Honour Retry-After only when it fits the turn; otherwise try the next model.
                    wait = min(e.retry_after, deadline - time.monotonic() - 0.5)
                    if wait > 0 and entry is self.models.chain(tier)[-1]:
                        await asyncio.sleep(wait)
                continue
            rec = attempt.record("ok")
            yield rec
            yield Final(
                text=sent,
                provider=entry.provider,
                model=entry.model,
                tier=tier,
                input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens,
                cost=rec.cost,
            )
            return
        # Every model failed or time ran out: never silent.
        text = f"{sent}\n\n{self.settings.fallback_text}" if sent else self.settings.fallback_text
        yield Final(text=text, tier=tier, degraded=True)
        yield Escalate("model_failure", "no model could answer within the turn deadline")


class _Attempt:
    """One streamed call to one model, with its ledger record."""

    def __init__(self, entry: ModelEntry, tier: str) -> None:
        self.entry = entry
        self.tier = tier
        self.stream: ChatStream | None = None

    async def run(
        self, messages: list[ChatMessage], settings: ReplySettings, deadline: float
    ) -> AsyncIterator[str]:
        """Deltas of the call; raises LLMError (TIMEOUT when the turn deadline hits).

        The stream runs in a task of its own and hands deltas over a queue: the client's
        timeouts are bound to the task that started the stream, and the deadline must be able
        to stop it without cancelling the caller.
        """
        max_tokens = self.entry.max_tokens or settings.max_output_tokens
        stream = self.entry.client.stream_chat(self.entry.model, messages, max_tokens=max_tokens)
        self.stream = stream
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                async with stream:
                    async for delta in stream:
                        queue.put_nowait(delta)
                queue.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer, which raises it
                queue.put_nowait(e)

        task = asyncio.create_task(produce())
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(queue.get(), max(remaining, 0))
                except TimeoutError as e:
                    raise LLMError(
                        ErrorKind.TIMEOUT, "turn deadline", partial_text=stream.text
                    ) from e
                if item is None:
                    return
                if isinstance(item, LLMError):
                    raise item
                if isinstance(item, BaseException):
                    raise LLMError(ErrorKind.CONNECTION, repr(item)) from item
                if item:
                    yield item
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def record(self, outcome: str, error: str | None = None) -> CallRecord:
        stats = self.stream.stats if self.stream is not None else None
        usage = stats.usage if stats else None
        cost = self.entry.price.cost(usage) if usage else 0.0
        return CallRecord(
            provider=self.entry.provider,
            model=self.entry.model,
            outcome=outcome,
            tier=self.tier,
            first_token_ms=_ms(stats.first_token_s) if stats else None,
            latency_ms=_ms(stats.total_s) if stats else None,
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            usage_estimated=usage.estimated if usage else False,
            cost=cost,
            error=error,
        )
