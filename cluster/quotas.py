"""Allowances shared by every process that can be read before they are spent: upload bytes a
visitor or a site may still send today. (For limits that admit or refuse a call, see
limits.py.)

Each key is a bucket refilled continuously up to its allowance; spending may take it below
zero (a whole upload counts even when it was bigger than what was left). One round trip per
read or spend, on Redis's clock; a key expires once it would be full again, so a Redis
restart only forgets what was spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS: the buckets. ARGV: amount to spend (0: only read), then allowance and refill rate (a
# second) per key. Returns each bucket's level (after spending), as text.
_SPEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local amount = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local cap, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', key, 'level', 'at')
  local level = cap
  if b[1] then level = math.min(cap, tonumber(b[1]) + (now - tonumber(b[2])) * rate) end
  if amount > 0 then
    level = level - amount
    redis.call('HSET', key, 'level', string.format('%.3f', level), 'at', string.format('%.6f', now))
    redis.call('PEXPIRE', key, math.ceil((cap - level) / rate * 1000) + 1000)
  end
  out[i] = string.format('%.3f', level)
end
return out
"""


@dataclass(frozen=True, slots=True)
class Quota:
    """`allowance` units every `period_s` under keys starting with `name`."""

    name: str
    allowance: float
    period_s: float


class SharedQuotas:
    def __init__(self, redis: Redis) -> None:
        self._spend = redis.register_script(_SPEND)

    async def _run(self, quotas: Sequence[tuple[Quota, str]], amount: float) -> list[float]:
        args: list[float] = [amount]
        for q, _ in quotas:
            args += [q.allowance, q.allowance / q.period_s]
        out = await self._spend(keys=[f"{q.name}:{key}" for q, key in quotas], args=args)
        return [float(v) for v in out]

    async def left(self, quotas: Sequence[tuple[Quota, str]]) -> list[float]:
        """What each quota has left now."""
        return await self._run(quotas, 0)

    async def spend(self, quotas: Sequence[tuple[Quota, str]], amount: float) -> None:
        """Spend `amount` of every quota (below zero if need be: it was spent already)."""
        await self._run(quotas, amount)
