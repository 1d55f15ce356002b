"""Rate limits and "not before" holds shared by every process, checked in one round trip.

A rate limit is a GCRA (the generic cell rate algorithm): per key, Redis keeps the theoretical
arrival time of the next unit; `limit` units per `period` may pass, in bursts of up to `limit`.
`admit` reserves the amounts on all its limits at once (or none of them), so a caller asking
for one request and a few thousand tokens either gets both or waits for neither.

A hold is a key whose value is a time (ms, Redis's clock) before which nothing may pass: a
provider's Retry-After, an open circuit breaker. A hold with a probe lease admits exactly one
caller once its time has passed — the probe — and moves its time on by the lease, so the
others keep holding off while the probe runs (if the prober dies, the lease runs out and the
next caller probes).

Times come from Redis (`TIME`), not from the processes' clocks, which may disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS: the holds, then the rate keys. ARGV: the number of holds, each hold's probe lease (ms,
# 0 = no probe), the longest acceptable wait (ms), then amount, limit, period (ms) per rate.
# A hold's value is its time, with ":p" while a probe holds it. Returns {status, detail, ms}:
#   {0, i, ms}  hold i is on for ms more (-i: a probe holds it): nothing reserved
#   {1, 0, ms}  the limits would make the caller wait ms (more than allowed): nothing reserved
#   {2, i, ms}  admitted after waiting ms; i > 0: this caller holds hold i's probe
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holds = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[holds + 2])
local probe, probe_lease = 0, 0
for h = 1, holds do
  local v = redis.call('GET', KEYS[h])
  if v then
    local untl = tonumber(string.match(v, '^[%d.]+'))
    if untl > now then
      local which = h
      if string.find(v, ':p', 1, true) then which = -h end
      return {0, which, math.ceil(untl - now)}
    end
    local lease = tonumber(ARGV[h + 1])
    if lease > 0 and probe == 0 then
      probe, probe_lease = h, lease
    end
  end
end
local worst = 0
local tats = {}
local a = holds + 3
for r = holds + 1, #KEYS do
  local amount, limit, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local tat = tonumber(redis.call('GET', KEYS[r]) or now)
  if tat < now then tat = now end
  local new_tat = tat + amount * period / limit
  local wait = new_tat - period - now
  if wait > worst then worst = wait end
  tats[r] = new_tat
end
if worst > max_wait then
  return {1, 0, math.ceil(worst)}
end
for r = holds + 1, #KEYS do
  redis.call('SET', KEYS[r], string.format('%.3f', tats[r]), 'PX', math.ceil(tats[r] - now) + 1000)
end
if probe > 0 then
  redis.call('SET', KEYS[probe], string.format('%d:p', now + probe_lease), 'KEEPTTL')
end
return {2, probe, math.ceil(worst)}
"""

# KEYS[1]: a hold. ARGV: seconds ahead (ms), keep-later flag (1: never shorten a longer hold),
# the key's lifetime beyond that time (ms). Returns the hold's remaining ms.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + tonumber(ARGV[1])
if ARGV[2] == '1' then
  local v = tonumber(string.match(redis.call('GET', KEYS[1]) or '0', '^[%d.]+'))
  if v > untl then return v - now end
end
redis.call('SET', KEYS[1], string.format('%d', untl), 'PX', tonumber(ARGV[1]) + tonumber(ARGV[3]))
return untl - now
"""


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` units per `period` seconds on `key`, in bursts of up to `limit`."""

    key: str
    limit: float
    period: float


@dataclass(frozen=True, slots=True)
class Hold:
    """A "not before" key; with `probe_lease` (seconds) one caller probes once it is over."""

    key: str
    probe_lease: float = 0.0


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    wait: float  # admitted: sleep this long first; refused by a limit: the wait it needed
    held_by: Hold | None = None  # refused by this hold, for `held_for` more seconds
    held_for: float = 0.0
    probed: bool = False  # held by a probe running elsewhere: may end early (a success)
    probe: Hold | None = None  # admitted as this hold's one probe


class SharedLimits:
    """The limits and holds of one Redis (scripts are reloaded after a Redis restart)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._hold = redis.register_script(_HOLD)

    async def admit(
        self,
        asks: Sequence[tuple[Rate, float]],
        holds: Sequence[Hold] = (),
        *,
        max_wait: float,
    ) -> Admission:
        """Check the holds, then reserve `amount` on each rate if the longest wait that needs
        is at most `max_wait` seconds. One round trip."""
        args: list[float | int] = [len(holds)]
        args += [round(h.probe_lease * 1000) for h in holds]
        args.append(round(max_wait * 1000))
        for rate, amount in asks:
            args += [amount, rate.limit, rate.period * 1000]
        keys = [h.key for h in holds] + [r.key for r, _ in asks]
        status, detail, ms = await self._admit(keys, args)
        if status == 0:
            return Admission(False, 0.0, holds[abs(detail) - 1], ms / 1000, probed=detail < 0)
        if status == 1:
            return Admission(False, ms / 1000)
        return Admission(True, ms / 1000, probe=holds[detail - 1] if detail else None)

    async def hold(
        self, key: str, seconds: float, *, keep_later: bool = True, linger: float = 0.0
    ) -> float:
        """Hold `key` for `seconds` from now (with `keep_later`, a longer hold stays); the key
        lives `linger` seconds past that. Returns how long the hold now lasts."""
        ms = await self._hold(
            [key], [max(1, round(seconds * 1000)), int(keep_later), round(linger * 1000)]
        )
        return int(ms) / 1000

    async def release(self, key: str) -> None:
        await self.redis.delete(key)
