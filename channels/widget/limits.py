"""In-process rate limits of the widget: token buckets per visitor and per IP address, and a
cap on open connections per IP. (Scale-out keeps such counters in Redis; one process keeps
them here.)"""

from __future__ import annotations

import time
from collections import Counter

from aiohttp import web


class KeyedBuckets:
    """A token bucket per key: `per_minute` tokens, refilled continuously, burst = per_minute."""

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def retry_after(self, key: str, now: float | None = None) -> float:
        """0 if a token is there, else the seconds until one is."""
        now = time.monotonic() if now is None else now
        level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (self._level(key, now) - 1, now)

    def _prune(self, now: float) -> None:
        """Forget full buckets: a key nobody used for a while is as good as new."""
        full = [k for k in self._buckets if self._level(k, now) >= self.capacity]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:  # all busy: drop the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[: len(oldest) // 2]:
                del self._buckets[k]


class ConnectionCounter:
    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self._open: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        if self._open[ip] >= self.per_ip:
            return False
        self._open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

    @property
    def total(self) -> int:
        return sum(self._open.values())


def client_ip(request: web.Request, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first
    return request.remote or "unknown"
