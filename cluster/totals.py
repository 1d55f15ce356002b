"""Running totals (money spent today, ...) that every process adds to and reads without waiting.

Reads are local and synchronous: each process keeps the total as Redis last told it plus what
it added since. A background task sends the additions and reads the totals back every
`interval` seconds in one round trip, so a process sees the others' additions at most about
one interval (plus a round trip) late, and its own at once.

A total Redis does not have (the first process to start, or after a Redis restart lost it) is
created from this process's last known value — so several processes seeding the same total
(from the ledger, at start) count it once, and a restart does not reset it to zero. While
Redis is down each process goes on adding to its own view; the additions are sent once Redis
answers again. (If Redis applied an addition but its answer was lost, the addition is sent
again: a total may come out a little high, never low.)
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis

from cluster.outage import Outage, RedisUnavailable

INTERVAL_S = 0.5
# Totals of past days are of no use after a while (the ledger keeps the record).
KEEP_S = 3 * 86400

# KEYS: the totals. ARGV: the lifetime (ms), then per key its addition and the value to start
# it from if it is missing. Returns the totals after the additions.
_SYNC = """
local ttl = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, ARGV[2 * i + 1])
  end
  out[i] = redis.call('INCRBYFLOAT', key, ARGV[2 * i])
  redis.call('PEXPIRE', key, ttl)
end
return out
"""


class SharedTotals:
    """Totals named by their Redis keys."""

    def __init__(self, redis: Redis, *, interval: float = INTERVAL_S, what: str = "totals"):
        self.interval = interval
        self._sync = redis.register_script(_SYNC)
        self._known: dict[str, float] = {}  # as Redis last said
        self._pending: dict[str, float] = {}  # added here since
        self._retired: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        # One sync at a time: two would both send the same additions.
        self._syncing = asyncio.Lock()
        self.outage = Outage(what)

    def value(self, key: str) -> float:
        return self._known.get(key, 0.0) + self._pending.get(key, 0.0)

    def add(self, key: str, amount: float) -> None:
        self._pending[key] = self._pending.get(key, 0.0) + amount
        self._known.setdefault(key, 0.0)

    def seed(self, key: str, value: float) -> None:
        """Start `key` from `value` unless Redis has it already (then Redis's value wins)."""
        self._known[key] = value
        self._pending.setdefault(key, 0.0)

    def retire(self, key: str) -> None:
        """Stop following `key` once what was added to it is sent."""
        self._retired.add(key)

    async def sync(self) -> None:
        """Send the additions and read the totals back; raises RedisUnavailable."""
        async with self._syncing:
            await self._sync_now()

    async def _sync_now(self) -> None:
        keys = list(self._known)
        if not keys:
            return
        sent = {k: self._pending.get(k, 0.0) for k in keys}
        args: list[int | str] = [KEEP_S * 1000]
        for k in keys:
            args += [repr(sent[k]), repr(self._known[k])]
        totals = await self.outage.call(self._sync(keys, args))
        for k, total in zip(keys, totals, strict=True):
            # Added while the answer was on its way: still pending.
            self._pending[k] = self._pending.get(k, 0.0) - sent[k]
            self._known[k] = float(total)
            if k in self._retired and not self._pending[k]:
                self._retired.discard(k)
                del self._known[k], self._pending[k]

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="shared-totals")

    async def aclose(self) -> None:
        """Stop syncing; send what is still pending if Redis answers."""
        if self._task is not None:
            # Not cancelled: a sync cut off mid-way may have been applied without its answer,
            # and would be sent again.
            self._stop.set()
            await self._task
            self._task = None
        with contextlib.suppress(RedisUnavailable):
            await self.sync()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            with contextlib.suppress(RedisUnavailable):
                await self.sync()
