"""Capped slots shared by every process: at most `cap` open connections per address, however
the load balancer spreads them.

A slot is a claim with a lease (a sorted set per key: claim -> lease end, Redis's clock), and
the process that holds it renews its claims while they stay open, so the claims of a process
that died lapse within a lease. After a Redis restart the renewal puts back what is still
open. One round trip per claim.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from cluster.redis import LUA_NOW_MS

# KEYS[1]: the key's claims. ARGV: cap, lease (ms), the new claim. Lapsed claims go first.
_CLAIM = (
    LUA_NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: claim sets; ARGV[1]: lease (ms), then the claim in each key. Renews (or puts back).
_RENEW = (
    LUA_NOW_MS
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[1 + i])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""
)


class SharedSlots:
    """At most `cap` claims per key across processes; call `renew` every `lease_s / 3`."""

    def __init__(self, redis: Redis, name: str, cap: int, lease_s: float = 60.0) -> None:
        self.name = name
        self.cap = cap
        self.lease_s = lease_s
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._held: dict[str, str] = {}  # claim -> key: this process's open claims

    def _key(self, key: str) -> str:
        return f"{self.name}:{key}"

    async def claim(self, key: str) -> str | None:
        """One of `key`'s slots (the claim's id, for `release`), or None when all are taken."""
        claim = uuid.uuid4().hex
        got = await self._claim(
            keys=[self._key(key)], args=[self.cap, round(self.lease_s * 1000), claim]
        )
        if not got:
            return None
        self._held[claim] = key
        return claim

    async def release(self, claim: str) -> None:
        key = self._held.pop(claim, None)
        if key is not None:
            await self._redis.zrem(self._key(key), claim)

    def forget(self, claim: str) -> None:
        """Stop renewing a claim Redis could not be told about (it lapses by itself)."""
        self._held.pop(claim, None)

    async def renew(self) -> int:
        """Renew (or put back) every claim this process holds; how many."""
        held = list(self._held.items())
        if held:
            await self._renew(
                keys=[self._key(key) for _, key in held],
                args=[round(self.lease_s * 1000), *(claim for claim, _ in held)],
            )
        return len(held)

    @property
    def held(self) -> int:
        return len(self._held)
