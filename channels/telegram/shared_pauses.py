"""Telegram's Retry-After for a chat, held for every process (queue.backend: redis).

A 429 that one process gets pauses the chat for all: each asks Redis before a call to a chat
(one round trip). While Redis cannot be reached a process keeps only its own pauses (logged
once by `Outage`), as a single process always does.
"""

from __future__ import annotations

import contextlib

from cluster.limits import Hold, SharedLimits
from cluster.outage import Outage, RedisUnavailable
from cluster.redis import RedisParts


class SharedChatPauses:
    def __init__(self, cluster: RedisParts, account: str) -> None:
        self._limits = SharedLimits(cluster.state)
        self._keys = cluster.keys
        self._account = account
        self.outage = Outage("telegram_retry_after")

    def _key(self, chat_id: int) -> str:
        return self._keys("tg_pause", self._account, chat_id)

    async def remaining(self, chat_id: int) -> float:
        """Seconds this process or another was told to leave the chat alone (0.0: none)."""
        try:
            got = await self.outage.call(
                self._limits.admit([], [Hold(self._key(chat_id))], max_wait=0.0)
            )
        except RedisUnavailable:
            return 0.0
        return 0.0 if got.admitted else got.held_for

    async def hold(self, chat_id: int, seconds: float) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(self._limits.hold(self._key(chat_id), seconds))
