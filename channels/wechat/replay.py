"""Replay protection for WeChat Official Account callbacks.

In plaintext and compatible mode the signature covers the Token, the timestamp and the nonce,
not the body: one captured callback URL would sign any body. A callback is accepted only
within `window_s` of our clock, and a (timestamp, nonce) pair only ever with one body —
WeChat's retries of the same message (same body) still pass, and storing them is idempotent.

The seen pairs live behind `NonceStore`: in memory in one process, in Redis (one SET NX GET
with an expiry) when several processes share the callbacks, so a pair seen by one is known
to all.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis

from channels.http import ApiError
from cluster.outage import Outage, RedisUnavailable
from cluster.redis import Keys

WINDOW_SECONDS = 300.0


class NonceStore(Protocol):
    async def remember(self, key: str, value: str, ttl_s: float) -> str | None:
        """Keep `value` under `key` for `ttl_s` unless the key is there already; the value
        kept before (None: the key is new)."""
        ...


class InMemoryNonceStore:
    """One process's seen nonces, oldest first; bounded (the oldest go first when full)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def remember(self, key: str, value: str, ttl_s: float) -> str | None:
        now = time.monotonic()
        while self._seen:
            oldest, (expires, _) = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        known = self._seen.pop(key, None)
        if known is not None and known[0] > now:
            self._seen[key] = known
            return known[1]
        self._seen[key] = (now + ttl_s, value)
        return None


class RedisNonceStore:
    """Seen nonces shared by every process. While Redis cannot be reached, each process
    checks against its own (`InMemoryNonceStore`): a replay then passes only if it lands on
    another process within the outage (logged by `Outage`)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._local = InMemoryNonceStore()
        self.outage = Outage("wechat_nonces")

    async def remember(self, key: str, value: str, ttl_s: float) -> str | None:
        # Kept locally as well, for an outage to come.
        seen_here = await self._local.remember(key, value, ttl_s)
        name = self._keys("wx_nonce", hashlib.sha256(key.encode()).hexdigest())
        try:
            before = await self.outage.call(
                self._redis.set(name, value, nx=True, px=max(1, int(ttl_s * 1000)), get=True)
            )
        except RedisUnavailable:
            return seen_here
        if before is None:
            return seen_here  # new to Redis; this process may remember it (Redis restarted)
        return before.decode() if isinstance(before, bytes) else str(before)


class ReplayGuard:
    def __init__(
        self,
        store: NonceStore | None = None,
        window_s: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: NonceStore = store or InMemoryNonceStore()
        self.window_s = window_s
        self.clock = clock

    async def check(self, scope: str, timestamp: str, nonce: str, body: bytes) -> None:
        """Refuse (403) a callback outside the time window, or a timestamp and nonce seen
        before with another body. Call after the signature check."""
        try:
            sent = int(timestamp)
        except ValueError:
            raise ApiError(403, "invalid_timestamp", "timestamp must be Unix seconds") from None
        if abs(self.clock() - sent) > self.window_s:
            raise ApiError(
                403,
                "stale_timestamp",
                f"the callback's timestamp is more than {self.window_s:.0f} s from this "
                "server's clock: a replay, or a clock to set right (NTP)",
            )
        digest = hashlib.sha256(body).hexdigest()
        # Entries outlive the window both ways (clock skew), then the window refuses anyway.
        before = await self.store.remember(
            f"{scope}\0{timestamp}\0{nonce}", digest, 2 * self.window_s
        )
        if before is not None and before != digest:
            raise ApiError(
                403, "replayed", "this timestamp and nonce came with another message before"
            )
