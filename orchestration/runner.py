"""One model call of a tier, made resilient: the tier's chain is tried in order; a model is
retried with backoff and jitter only before its first token; a slow first token is hedged by
the next model. A stream cut after the shopper saw some of its text continues on the next
model from exactly that text (orchestration/continuation.py); a cut whose text nobody saw is
dropped and the next model starts clean, so one answer is never two attempts strung
together. Every attempt — failed, hedged, cancelled — becomes a ledger record.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from orchestration.config import ResilienceSettings
from orchestration.continuation import Splice, continuation_messages, last_question
from orchestration.events import CallRecord
from orchestration.llm.client import ChatStream
from orchestration.llm.registry import ModelEntry, ModelRegistry
from orchestration.llm.tokens import estimate_messages_tokens
from orchestration.llm.types import ChatMessage, ErrorKind, LLMError
from orchestration.resilience import Guards

log = structlog.get_logger(__name__)

# Put in an attempt's queue when the deadline its consumer waits for has passed.
_EXPIRED = object()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass(frozen=True, slots=True)
class CallSpec:
    """What to ask and how to label it in the ledger."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    purpose: str = "reply"
    specialist: str | None = None
    intent: str | None = None
    extra: dict[str, Any] | None = None  # tools, response_format...


class _Attempt:
    """One streamed call in a task of its own, handing items over a queue.

    The client's timeouts belong to the task that started the stream, and a deadline or a
    lost hedge race must be able to stop it without cancelling the caller.
    """

    def __init__(
        self,
        entry: ModelEntry,
        tier: str,
        spec: CallSpec,
        messages: list[ChatMessage],
        flush_s: float = 0.0,
    ):
        self.entry = entry
        self.flush_s = flush_s
        self.tier = tier
        self.spec = spec
        self.stream: ChatStream = entry.client.stream_chat(
            entry.model,
            messages,
            max_tokens=entry.max_tokens or spec.max_tokens,
            extra=spec.extra,
        )
        self.queue: asyncio.Queue[str | BaseException | object | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._produce())
        self.started = time.monotonic()
        self.recorded = False  # whether its ledger record was made
        # One timer per deadline, not one per delta: it drops _EXPIRED into the queue.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = 0.0

    async def _produce(self) -> None:
        # Deltas are handed on at most once per `flush_s`: the first at once, the ones that
        # follow it within that time together. Every layer above (orchestration, the
        # channel sinks, the event bus and its streams) then wakes ~10 times a second per
        # answer (at 100 ms) instead of once per token: what keeps a busy loop responsive.
        loop = asyncio.get_running_loop()
        pending: list[str] = []
        timer: asyncio.TimerHandle | None = None
        next_at = 0.0

        def flush() -> None:
            nonlocal timer, next_at
            timer = None
            if pending:
                self.queue.put_nowait("".join(pending))
                pending.clear()
                next_at = loop.time() + self.flush_s

        end: BaseException | None = None  # None: the stream ended well
        try:
            async with self.stream:
                async for delta in self.stream:
                    if not delta:
                        continue
                    pending.append(delta)
                    if timer is None:
                        if loop.time() >= next_at:
                            flush()
                        else:
                            timer = loop.call_at(next_at, flush)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            end = e
        finally:
            if timer is not None:
                timer.cancel()
        flush()  # (also before a failure: what streamed until then still counts as sent)
        self.queue.put_nowait(end)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer_deadline == deadline:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_deadline = deadline
        self._timer = loop.call_at(loop.time() + deadline - time.monotonic(), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.queue.put_nowait(_EXPIRED)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next(self, deadline: float) -> str | None:
        """The next delta; None at the end. Raises LLMError (TIMEOUT at the deadline)."""
        while True:
            if deadline - time.monotonic() <= 0:
                raise LLMError(ErrorKind.TIMEOUT, "turn deadline", partial_text=self.stream.text)
            if self.queue.empty():
                self._arm(deadline)
            item = await self.queue.get()
            if item is not _EXPIRED:
                break  # (an expiry is checked against the deadline at the top)
        if item is None or isinstance(item, BaseException):
            self._disarm()
        if isinstance(item, LLMError):
            raise item
        if isinstance(item, BaseException):
            raise LLMError(ErrorKind.CONNECTION, repr(item)) from item
        assert item is None or isinstance(item, str)
        return item

    async def cancel(self) -> None:
        self._disarm()
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def record(self, outcome: str, error: str | None = None) -> CallRecord:
        stats = self.stream.stats
        usage = stats.usage
        if usage.input_tokens == 0 and usage.output_tokens == 0 and outcome != "ok":
            # Cancelled before the provider said anything: it may still bill the prompt.
            usage.input_tokens = estimate_messages_tokens(self.spec.messages)
            usage.estimated = True
        return CallRecord(
            provider=self.entry.provider,
            model=self.entry.model,
            outcome=outcome,
            tier=self.tier,
            specialist=self.spec.specialist,
            purpose=self.spec.purpose,
            intent=self.spec.intent,
            first_token_ms=_ms(stats.first_token_s),
            latency_ms=_ms(time.monotonic() - self.started),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            usage_estimated=usage.estimated,
            cost=self.entry.price.cost(usage),
            error=error,
        )


@dataclass(slots=True)
class ChainResult:
    text: str = ""
    failed: bool = False
    entry: ModelEntry | None = None
    records: list[CallRecord] = field(default_factory=list)
    stream: ChatStream | None = None  # the winning stream (tool calls, usage)


class ModelRunner:
    def __init__(
        self,
        models: ModelRegistry,
        guards: Guards,
        settings: ResilienceSettings,
        *,
        flush_seconds: float = 0.0,
    ) -> None:
        self.models = models
        self.guards = guards
        self.settings = settings
        self.flush_seconds = flush_seconds  # see _Attempt._produce

    def call(
        self,
        tier: str,
        spec: CallSpec,
        deadline: float,
        on_record: Callable[[CallRecord], None] | None = None,
        attempt_timeout: float | None = None,
        seen: Callable[[str], bool] | None = None,
    ) -> ChainCall:
        """A call on `tier`'s chain, ending by `deadline`; with `attempt_timeout`, a model
        that has not finished by then gives way to the next one while time remains.

        `seen` is asked when an attempt fails after some of its text was handed on: True if
        the shopper may have seen it (the next model continues it), False if the caller
        dropped it (the next model starts clean). Without it, nothing was seen."""
        return ChainCall(self, tier, spec, deadline, on_record, attempt_timeout, seen)


class ChainCall:
    """`async for delta in call.deltas()`; then `call.result`."""

    def __init__(
        self,
        runner: ModelRunner,
        tier: str,
        spec: CallSpec,
        deadline: float,
        on_record: Callable[[CallRecord], None] | None,
        attempt_timeout: float | None = None,
        seen: Callable[[str], bool] | None = None,
    ) -> None:
        self.runner = runner
        self._seen = seen
        self.attempt_timeout = attempt_timeout
        self.tier = tier
        self.spec = spec
        self.deadline = deadline
        self.result = ChainResult()
        self._on_record = on_record
        self._chain = list(runner.models.chain(tier))
        self._tokens = estimate_messages_tokens(spec.messages) + spec.max_tokens

    def _record(self, attempt: _Attempt, outcome: str, error: str | None = None) -> None:
        attempt.recorded = True
        rec = attempt.record(outcome, error)
        self.result.records.append(rec)
        if self._on_record is not None:
            self._on_record(rec)

    def _stopped(self, attempt: _Attempt, outcome: str) -> None:
        """An attempt stopped before it could succeed or fail (a lost hedge, the turn's end):
        billed, and if it was the breaker's half-open probe, the probe is free again (else
        the model would stay refused for good)."""
        self._record(attempt, outcome)
        self.runner.guards.get(attempt.entry.ref).breaker.release_probe()

    def _fail(self, attempt: _Attempt, err: LLMError) -> None:
        self._record(attempt, err.kind.value, str(err))
        guard = self.runner.guards.get(attempt.entry.ref)
        if err.kind is ErrorKind.RATE_LIMIT:
            guard.cool(err.retry_after or 1.0)
        elif err.kind is not ErrorKind.BAD_REQUEST:
            guard.breaker.record(ok=False)

    def _messages(self, sent: str, entry: ModelEntry) -> list[ChatMessage]:
        if not sent:
            return list(self.spec.messages)
        return continuation_messages(
            self.spec.messages, sent, last_question(self.spec.messages), entry.continuation
        )

    async def _admit(self, entry: ModelEntry) -> bool:
        guard = self.runner.guards.get(entry.ref, *_limits(entry))
        wait = min(self.runner.settings.limiter_wait_seconds, self.deadline - time.monotonic())
        return await guard.admit(self._tokens, max(wait, 0))

    async def _open(self, index: int, sent: str) -> tuple[_Attempt, str | None, int]:
        """Start the model at `index` (retrying it before its first token) and race a hedge
        if its first token is slow. Returns the attempt that produced a first item, that
        item, and the chain index to continue from after it."""
        entry = self._chain[index]
        settings = self.runner.settings
        # tenacity's retrying object and its state refer to each other: a cycle only the
        # cyclic GC frees. The callbacks must not drag this call (its messages, stream,
        # records) into it, or every answer leaves its whole call graph for the GC.
        retry_until = self.deadline - 0.5

        def retryable(e: BaseException) -> bool:
            return (
                isinstance(e, LLMError)
                and e.kind in (ErrorKind.SERVER, ErrorKind.CONNECTION)
                and not e.partial_text
                and time.monotonic() < retry_until
            )

        def before_sleep(state: RetryCallState) -> None:
            log.info("model_retry", model=entry.ref, attempt=state.attempt_number)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(settings.retries + 1),
            wait=wait_random_exponential(
                multiplier=settings.backoff_initial_seconds, max=settings.backoff_max_seconds
            ),
            retry=retry_if_exception(retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                if try_.retry_state.attempt_number > 1 and not await self._admit(entry):
                    raise LLMError(ErrorKind.RATE_LIMIT, "no rate-limit slot for the retry")
                return await self._first(index, sent)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt_deadline(self, attempt: _Attempt) -> float:
        if self.attempt_timeout is None:
            return self.deadline
        return min(self.deadline, attempt.started + self.attempt_timeout)

    async def _first(self, index: int, sent: str) -> tuple[_Attempt, str | None, int]:
        entry = self._chain[index]
        attempt = _Attempt(
            entry, self.tier, self.spec, self._messages(sent, entry), self.runner.flush_seconds
        )
        try:
            return await self._first_item(attempt, index, sent)
        except asyncio.CancelledError:
            # Stopped while waiting for its first item (a tool round yields none until its
            # end): the call is closed and billed, not left streaming in the background.
            if not attempt.recorded:
                await attempt.cancel()
                self._stopped(attempt, "cancelled")
            raise

    async def _first_item(
        self, attempt: _Attempt, index: int, sent: str
    ) -> tuple[_Attempt, str | None, int]:
        entry = attempt.entry
        hedge_after = self.runner.settings.hedge_after_seconds
        backup_index = self._next_available(index + 1)
        if backup_index is None and self._next_available(index) == index:
            # No other model to hedge with: a second request to the same one usually gets
            # through where the first is stuck (a bad connection, a stuck replica).
            backup_index = index
        if hedge_after is None or backup_index is None or sent:
            try:
                return attempt, await attempt.next(self._attempt_deadline(attempt)), index
            except LLMError as e:
                self._fail(attempt, e)
                raise
        first_deadline = min(self._attempt_deadline(attempt), time.monotonic() + hedge_after)
        try:
            return attempt, await attempt.next(first_deadline), index
        except LLMError as e:
            if not (e.kind is ErrorKind.TIMEOUT and e.detail == "turn deadline"):
                self._fail(attempt, e)
                raise
            if time.monotonic() >= self._attempt_deadline(attempt):
                self._fail(attempt, e)
                raise
        # No first token yet: race the next model, keep whichever answers first.
        if not await self._admit(self._chain[backup_index]):
            try:
                return attempt, await attempt.next(self._attempt_deadline(attempt)), index
            except LLMError as e:
                self._fail(attempt, e)
                raise
        backup = _Attempt(
            self._chain[backup_index],
            self.tier,
            self.spec,
            self._messages(sent, self._chain[backup_index]),
            self.runner.flush_seconds,
        )
        log.info("model_hedged", slow=entry.ref, backup=self._chain[backup_index].ref)
        return await self._race(attempt, index, backup, backup_index)

    async def _race(
        self, a: _Attempt, a_index: int, b: _Attempt, b_index: int
    ) -> tuple[_Attempt, str | None, int]:
        pending = {
            asyncio.create_task(a.next(self._attempt_deadline(a))): (a, a_index),
            asyncio.create_task(b.next(self._attempt_deadline(b))): (b, b_index),
        }
        errors: list[LLMError] = []
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    attempt, _ = pending.pop(t)
                    exc = t.exception()
                    if exc is None:
                        for other_task, (other, _) in pending.items():
                            other_task.cancel()
                            await asyncio.gather(other_task, return_exceptions=True)
                            await other.cancel()
                            self._stopped(other, "hedge_lost")
                        pending.clear()
                        # The chain continues after the later of the two models.
                        return attempt, t.result(), max(a_index, b_index)
                    assert isinstance(exc, LLMError)
                    self._fail(attempt, exc)
                    errors.append(exc)
        finally:
            # Cancelled from outside (the turn's deadline, the fan-out): stop both calls and
            # bill them; nothing may be left running or unobserved.
            for task, (attempt, _) in pending.items():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await attempt.cancel()
                self._stopped(attempt, "cancelled")
        raise errors[-1]

    def _next_available(self, start: int) -> int | None:
        for i in range(start, len(self._chain)):
            if self.runner.guards.get(self._chain[i].ref, *_limits(self._chain[i])).available():
                return i
        return None

    async def deltas(self) -> AsyncIterator[str]:
        sent = ""
        settings = self.runner.settings
        failed_walks = 0
        while time.monotonic() < self.deadline:
            index = 0
            tried = False  # whether this walk reached any model (all may be cooling)
            while index < len(self._chain) and time.monotonic() < self.deadline:
                entry = self._chain[index]
                if not await self._admit(entry):
                    index += 1
                    continue
                tried = True
                try:
                    attempt, first, index = await self._open(index, sent)
                except LLMError:
                    index += 1
                    continue
                item = first
                # A continuation repeats some of the visible text more often than not.
                splice = Splice(sent)
                try:
                    while item is not None:
                        if piece := splice.feed(item):
                            sent += piece
                            yield piece
                        item = await attempt.next(self._attempt_deadline(attempt))
                    if piece := splice.end():
                        sent += piece
                        yield piece
                except LLMError as e:
                    self._fail(attempt, e)
                    await attempt.cancel()
                    if sent and not (self._seen is not None and self._seen(sent)):
                        sent = ""  # nobody saw it: the next model answers afresh
                    index += 1
                    continue
                except BaseException:
                    # The consumer stopped (cancelled, closed): bill what ran.
                    await attempt.cancel()
                    self._stopped(attempt, "cancelled")
                    raise
                self._record(attempt, "ok")
                self.runner.guards.get(attempt.entry.ref).breaker.record(ok=True)
                self.result.text = sent
                self.result.entry = attempt.entry
                self.result.stream = attempt.stream
                return
            # The chain failed, or every model was unavailable (a 429's cool-down, an open
            # breaker). While the turn has time, wait for the soonest model to be callable and
            # walk the chain again: a shopper would rather wait a moment than get canned text.
            # Only walks that reached a model count against `chain_walks`.
            failed_walks += tried
            if failed_walks >= settings.chain_walks:
                break
            now = time.monotonic()
            ready = min(self.runner.guards.get(e.ref, *_limits(e)).ready_at() for e in self._chain)
            backoff = settings.backoff_initial_seconds * (2 ** max(failed_walks - 1, 0))
            wait = max(ready - now, backoff * random.uniform(0.5, 1.0), 0.05)
            if now + wait + settings.min_attempt_seconds > self.deadline:
                break
            await asyncio.sleep(wait)
        self.result.text = sent
        self.result.failed = True


def _limits(entry: ModelEntry) -> tuple[int | None, int | None]:
    return entry.rpm, entry.tpm
