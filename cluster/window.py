"""Events counted over a sliding window, shared by every process (failed sign-ins, ...).

Each key is a sorted set of event times (Redis's clock, ms). Too many events within the
window lock the key until enough of them have aged out of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from redis.asyncio import Redis

from cluster.redis import LUA_NOW_MS

# KEYS: the windows. ARGV: per key its limit and window (ms). Returns the longest wait (ms)
# until every key is under its limit again (0: none is at it).
_WAIT = (
    LUA_NOW_MS
    + """
local worst = 0
for i, key in ipairs(KEYS) do
  local limit, window = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local n = redis.call('ZCARD', key)
  if n >= limit then
    -- Under the limit again once all but limit - 1 events have aged out.
    local at = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
    local wait = tonumber(at[2]) + window - now
    if wait > worst then worst = wait end
  end
end
return math.ceil(worst)
"""
)

# KEYS: the windows. ARGV: the window (ms), a tag making this event's member unique.
_ADD = (
    LUA_NOW_MS
    + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2] .. ':' .. i)
  redis.call('PEXPIRE', key, ARGV[1])
end
return now
"""
)


class SlidingWindows:
    """Sliding-window event counts in one Redis; one round trip per call."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._wait = redis.register_script(_WAIT)
        self._add = redis.register_script(_ADD)

    async def wait(self, checks: Sequence[tuple[str, int, float]]) -> float:
        """Seconds until each (key, limit, window seconds) is under its limit (0: now)."""
        args: list[int] = []
        for _, limit, window in checks:
            args += [limit, round(window * 1000)]
        ms = await self._wait([k for k, _, _ in checks], args)
        return int(ms) / 1000

    async def add(self, keys: Sequence[str], window: float) -> None:
        """One event now on each of `keys`, each kept `window` seconds."""
        await self._add(list(keys), [round(window * 1000), secrets.token_hex(8)])

    async def clear(self, key: str) -> None:
        await self.redis.delete(key)
