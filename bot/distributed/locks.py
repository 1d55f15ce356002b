"""Chat locks shared by the processes (queue.backend: redis): `LockStore` over Redis locks.

Ingest holds a chat's lock while it stores a message and queues it, so two first messages of
a new chat on two processes open one conversation, and the order in the conversation's work
stream is the order of storing. The work queue frees the lock in the script that queues the
message (one round trip for both). If Redis cannot be reached the message is stored without
the lock (logged): storing it matters more than the rare race the lock prevents."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import structlog

from bot.locks import HeldLock
from cluster.redis import REDIS_DOWN, RedisParts

log = structlog.get_logger(__name__)

# Longer than storing a message ever takes; a process killed while holding it frees it then.
HOLD_S = 10.0
# How long to wait for another process's hold (it stores one message: milliseconds).
WAIT_S = 5.0
_RETRY_S = 0.005
# Frees the lock only if it is still this holder's (not expired and taken by another).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLocks:
    def __init__(self, cluster: RedisParts) -> None:
        self._r = cluster.queue
        self._keys = cluster.keys
        self._unlock = self._r.register_script(_UNLOCK)

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[HeldLock | None]:
        name = self._keys("chat", *key) if isinstance(key, tuple) else self._keys("chat", key)
        held: HeldLock | None
        try:
            held = await self._acquire(HeldLock(name, secrets.token_hex(8)))
        except REDIS_DOWN as e:
            log.warning("chat_lock_unavailable", error=repr(e))
            held = None
        try:
            yield held
        finally:
            if held is not None and not held.released:
                try:
                    await self._unlock([held.name], [held.token])
                except REDIS_DOWN:
                    pass  # Redis went away: the lock expires by itself

    async def _acquire(self, held: HeldLock) -> HeldLock | None:
        deadline = time.monotonic() + WAIT_S
        while not await self._r.set(held.name, held.token, nx=True, px=int(HOLD_S * 1000)):
            if time.monotonic() > deadline:
                log.warning("chat_lock_wait_timed_out", lock=held.name)
                return None  # storing the message matters more than the race it prevents
            await asyncio.sleep(_RETRY_S)
        return held
