"""Per-model protection: circuit breakers, request/token rate limits and Retry-After cooling.

State is in-process by default; with several processes (queue.backend: redis) `SharedModelGuard`
keeps the same methods on state shared through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter

from cluster.limits import Hold, Rate, SharedLimits
from cluster.outage import Outage, RedisUnavailable
from cluster.redis import RedisParts
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
    """The guards of all models; with `shared` (the distributed mode) one state for all
    processes."""

    def __init__(self, settings: ResilienceSettings, shared: RedisParts | None = None) -> None:
        self.settings = settings
        self._guards: dict[str, ModelGuard] = {}
        self.shared = SharedGuardState(shared) if shared is not None else None

    def get(self, ref: str, rpm: int | None = None, tpm: int | None = None) -> ModelGuard:
        g = self._guards.get(ref)
        if g is None:
            if self.shared is None:
                g = ModelGuard(ref, self.settings, rpm, tpm)
            else:
                g = SharedModelGuard(ref, self.settings, rpm, tpm, self.shared)
            self._guards[ref] = g
        return g

    def snapshot(self) -> dict[str, str]:
        return {ref: g.breaker.state.value for ref, g in self._guards.items()}

    async def aclose(self) -> None:
        """Let what this process is telling the others arrive (nothing to do in-process)."""
        if self.shared is not None:
            await self.shared.settle()


# -- shared through Redis (queue.backend: redis) ---------------------------------------------
#
# What one process learns, all act on:
# - a 429's Retry-After holds the model off in every process (key "cool:<model>");
# - a breaker opened by one process's failures is open in all (key "breaker:<model>", the
#   time it may be probed); once that time passes, exactly one process probes (it holds the
#   probe for one cooldown, so a prober that dies is replaced), and its verdict closes the
#   breaker for all or opens it again. Failures are counted per process: a model failing in
#   one process opens the breaker for all, failures spread thinly over several processes do
#   not add up.
# - rpm/tpm limits are GCRA limits in Redis: all processes together stay under them.
# A process checks all of that in one round trip before each call (`admit`), and remembers
# the holds it was told about (not a running probe's, which a success ends early), so that
# `available()` and `ready_at()` stay local reads.
# While Redis is down (or slower than cluster.outage.CALL_TIMEOUT_S) each process falls back
# to its own breaker and limiters: the providers may then see up to N processes' worth of
# requests until Redis answers again, and a model's 429 holds off only the process that got
# it. That is logged once per outage.
#
# A breaker's key outlives its open time by this much: a model nobody calls for a day is
# closed again without a probe.
BREAKER_LINGER_S = 86400.0


class SharedGuardState:
    """What the shared guards of one process use: Redis, key names, and the writes in flight."""

    def __init__(self, cluster: RedisParts) -> None:
        self.keys = cluster.keys
        self.limits = SharedLimits(cluster.state)
        self.outage = Outage("model guards")
        self._writes: set[asyncio.Task[None]] = set()

    def tell(self, write: Coroutine[Any, Any, object]) -> None:
        """Send `write` in the background: the callers (a model call's outcome) are sync and
        must not wait for Redis. Lost when Redis is down, as the fallback allows."""

        async def send() -> None:
            with contextlib.suppress(RedisUnavailable):
                await self.outage.call(write)

        task = asyncio.get_running_loop().create_task(send())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def settle(self) -> None:
        """Wait for the writes in flight."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class SharedBreaker(CircuitBreaker):
    """Counts this process's outcomes like CircuitBreaker; opening it, the probe's verdict
    and closing it are told to the other processes through its guard."""

    guard: SharedModelGuard

    def record(self, ok: bool, now: float | None = None) -> None:
        was = self.state
        super().record(ok, now)
        g = self.guard
        if g.probing_shared:
            g.probing_shared = False
            if ok:
                g.shared.tell(g.shared.limits.release(g.breaker_hold.key))
            else:
                g.open_for_all()
        elif self.state is BreakerState.OPEN and was is not BreakerState.OPEN:
            g.open_for_all()

    def release_probe(self) -> None:
        super().release_probe()
        g = self.guard
        if g.probing_shared:
            g.probing_shared = False
            # Probe-able again at once, by whichever process asks first.
            g.shared.tell(
                g.shared.limits.hold(
                    g.breaker_hold.key, 0.001, keep_later=False, linger=BREAKER_LINGER_S
                )
            )


class SharedModelGuard(ModelGuard):
    """ModelGuard on state shared by all processes (see above)."""

    def __init__(
        self,
        ref: str,
        settings: ResilienceSettings,
        rpm: int | None,
        tpm: int | None,
        shared: SharedGuardState,
    ) -> None:
        super().__init__(ref, settings, rpm, tpm)
        self.shared = shared
        breaker = SharedBreaker(
            settings.breaker_failures,
            settings.breaker_error_rate,
            settings.breaker_window,
            settings.breaker_cooldown_seconds,
        )
        breaker.guard = self
        self.breaker = breaker
        keys = shared.keys
        self.cool_hold = Hold(keys("cool", ref))
        self.breaker_hold = Hold(keys("breaker", ref), probe_lease=breaker.cooldown_s)
        self._holds = (self.cool_hold, self.breaker_hold)
        self._rpm_rate = Rate(keys("rpm", ref), rpm, 60.0) if rpm else None
        self._tpm_rate = Rate(keys("tpm", ref), tpm, 60.0) if tpm else None
        self.probing_shared = False  # this process holds the breaker's one probe...
        self._probe_until = 0.0  # ...until then (monotonic), as Redis does

    async def admit(self, tokens: int, wait_s: float) -> bool:
        b = self.breaker
        now = time.monotonic()
        # Holds this process knows of (its own 429s, holds Redis told it about, a breaker it
        # opened) need no round trip; they never outlast the shared ones.
        if now < self.cool_until:
            return False
        if b.state is BreakerState.HALF_OPEN and b.probing:
            if now < self._probe_until:
                return False
            # A probe that never gave a verdict (cancelled): its lease has run out in Redis
            # too, and Redis decides who probes next.
            b.probing = self.probing_shared = False
        asks: list[tuple[Rate, float]] = []
        if self._rpm_rate is not None:
            asks.append((self._rpm_rate, 1))
        if self._tpm_rate is not None:
            asks.append((self._tpm_rate, min(tokens, self._tpm_max)))
        try:
            a = await self.shared.outage.call(
                self.shared.limits.admit(asks, self._holds, max_wait=max(wait_s, 0.0))
            )
        except RedisUnavailable:
            return await super().admit(tokens, wait_s)
        if not a.admitted:
            # Remembered, except a probe's hold: its success closes the breaker early.
            if a.held_by is not None and not a.probed:
                self.cool_until = max(self.cool_until, time.monotonic() + a.held_for)
            return False
        if a.probe is not None:
            b.state, b.probing = BreakerState.HALF_OPEN, True
            self.probing_shared = True
            self._probe_until = time.monotonic() + a.probe.probe_lease
        elif b.state is not BreakerState.CLOSED:
            # Closed for all (another process's probe succeeded, or Redis forgot it).
            b.state, b.probing, b.consecutive = BreakerState.CLOSED, False, 0
            b.recent.clear()
        if a.wait > 0:
            try:
                await asyncio.sleep(a.wait)
            except BaseException:
                if self.probing_shared:
                    b.release_probe()
                raise
        return True

    def cool(self, retry_after_s: float) -> None:
        super().cool(retry_after_s)
        self.shared.tell(self.shared.limits.hold(self.cool_hold.key, retry_after_s))

    def open_for_all(self) -> None:
        cooldown = self.breaker.cooldown_s
        # Known here at once: this process's next admit must not ask Redis before the hold
        # has arrived there (it would find no hold and close the breaker again).
        self.cool_until = max(self.cool_until, time.monotonic() + cooldown)
        self.shared.tell(
            self.shared.limits.hold(
                self.breaker_hold.key, cooldown, keep_later=False, linger=BREAKER_LINGER_S
            )
        )
