"""Chat locks shared by the processes (queue.backend: redis): `LockStore` over Redis locks.

Ingest holds a chat's lock while it stores a message and queues it, so two first messages of
a new chat on two processes open one conversation, and the order in the conversation's work
stream is the order of storing. If Redis cannot be reached the message is stored without the
lock (logged): storing it matters more than the rare race the lock prevents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import structlog
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from cluster.redis import REDIS_DOWN, RedisParts

log = structlog.get_logger(__name__)

# Longer than storing a message ever takes; a process killed while holding it frees it then.
HOLD_S = 10.0
# How long to wait for another process's hold (it stores one message: milliseconds).
WAIT_S = 5.0


class RedisLocks:
    def __init__(self, cluster: RedisParts) -> None:
        self._r = cluster.queue
        self._keys = cluster.keys

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        name = self._keys("chat", *key) if isinstance(key, tuple) else self._keys("chat", key)
        lock = Lock(self._r, name, timeout=HOLD_S, sleep=0.005, blocking_timeout=WAIT_S)
        try:
            got = await lock.acquire()
        except REDIS_DOWN as e:
            log.warning("chat_lock_unavailable", error=repr(e))
            got = False
        try:
            yield
        finally:
            if got:
                try:
                    await lock.release()
                except (LockError, *REDIS_DOWN):
                    pass  # expired (a very slow store) or Redis went away: nothing to free
