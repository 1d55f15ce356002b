"""Per-model protection: circuit breakers, request/token rate limits and Retry-After cooling.

State is in-process here; the Redis-backed variant for several replicas implements the same
`ModelGuard` methods.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from orchestration.config import ResilienceSettings


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Opens after N consecutive failures or an error share over the last calls; after a
    cooldown lets one probe through (half-open); the probe's outcome closes or reopens it."""

    failures_to_open: int = 5
    error_rate: float = 0.5
    window: int = 20
    cooldown_s: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    probing: bool = False
    recent: deque[bool] = field(default_factory=deque)  # True = failure

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
            self.probing = False
        if self.state is BreakerState.HALF_OPEN and not self.probing:
            self.probing = True  # exactly one probe at a time
            return True
        return False

    def record(self, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.recent.append(not ok)
        while len(self.recent) > self.window:
            self.recent.popleft()
        if ok:
            self.consecutive = 0
            if self.state is not BreakerState.CLOSED:
                self.state = BreakerState.CLOSED
                self.recent.clear()
            self.probing = False
            return
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        full = len(self.recent) >= self.window // 2
        share = sum(self.recent) / len(self.recent)
        if self.consecutive >= self.failures_to_open or (full and share >= self.error_rate):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.probing = False

    def release_probe(self) -> None:
        """A probe that ended without a verdict (cancelled): let another one try."""
        self.probing = False


class ModelGuard:
    """Breaker, limits and cooling of one provider model."""

    def __init__(self, ref: str, settings: ResilienceSettings, rpm: int | None, tpm: int | None):
        self.ref = ref
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_error_rate,
            settings.breaker_window,
            settings.breaker_cooldown_seconds,
        )
        self._rpm = AsyncLimiter(rpm, 60) if rpm else None
        self._tpm = AsyncLimiter(tpm, 60) if tpm else None
        self._tpm_max = tpm or 0
        self.cool_until = 0.0  # Retry-After: no calls before this (monotonic)

    def available(self) -> bool:
        """Whether a call may start now (doesn't claim a half-open probe)."""
        if time.monotonic() < self.cool_until:
            return False
        b = self.breaker
        if b.state is BreakerState.OPEN:
            return time.monotonic() - b.opened_at >= b.cooldown_s
        return not (b.state is BreakerState.HALF_OPEN and b.probing)

    def ready_at(self) -> float:
        """When a call may start (monotonic time; now or earlier when it may start now)."""
        at = self.cool_until
        b = self.breaker
        if b.state is BreakerState.OPEN:
            at = max(at, b.opened_at + b.cooldown_s)
        return at

    async def admit(self, tokens: int, wait_s: float) -> bool:
        """Claim a call slot (breaker, then rate limits) waiting at most `wait_s`."""
        if time.monotonic() < self.cool_until or not self.breaker.allow():
            return False
        try:
            async with asyncio.timeout(wait_s):
                if self._rpm is not None:
                    await self._rpm.acquire()
                if self._tpm is not None:
                    await self._tpm.acquire(min(tokens, self._tpm_max))
        except TimeoutError:
            if self.breaker.state is BreakerState.HALF_OPEN:
                self.breaker.release_probe()
            return False
        return True

    def cool(self, retry_after_s: float) -> None:
        self.cool_until = max(self.cool_until, time.monotonic() + retry_after_s)


class Guards:
    def __init__(self, settings: ResilienceSettings) -> None:
        self.settings = settings
        self._guards: dict[str, ModelGuard] = {}

    def get(self, ref: str, rpm: int | None = None, tpm: int | None = None) -> ModelGuard:
        g = self._guards.get(ref)
        if g is None:
            g = self._guards[ref] = ModelGuard(ref, self.settings, rpm, tpm)
        return g

    def snapshot(self) -> dict[str, str]:
        return {ref: g.breaker.state.value for ref, g in self._guards.items()}
