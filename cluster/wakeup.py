"""A process's mailbox for wake-ups: a Lua script or another process publishes a token on
this process's channel, and the task here waiting for that token wakes up.

One subscription per mailbox (not one connection per waiter), so thousands of waiting
requests cost one Redis connection. A wake-up is only a hint: pub/sub drops messages while
the connection is down, so a waiter always re-reads the state it waits for when its own
timeout ends; a lost wake-up costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from redis.asyncio import Redis

from cluster.redis import REDIS_DOWN

log = structlog.get_logger(__name__)

RECONNECT_S = 0.5  # pause between attempts to subscribe again while Redis is down
POLL_S = 5.0  # an idle subscriber checks its connection (health check) this often

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


def mailbox(prefix: str, process: str) -> str:
    """The channel of `process`'s mailbox among those named `prefix` (a Lua script that
    knows the waiter's process builds the same name: prefix .. ":" .. process)."""
    return f"{prefix}:{process}"


class Wakeups:
    def __init__(self, redis: Redis, prefix: str, process: str, spawn: Spawn | None = None) -> None:
        self._redis = redis
        self.prefix = prefix
        self.process = process
        self.channel = mailbox(prefix, process)
        self._spawn: Spawn = spawn or asyncio.create_task
        self._waiting: dict[str, asyncio.Event] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def expect(self, token: str) -> asyncio.Event:
        """The event set when `token` is published here (register before making the change
        that leads someone to publish it)."""
        ev = self._waiting.get(token)
        if ev is None:
            ev = self._waiting[token] = asyncio.Event()
        return ev

    def forget(self, token: str) -> None:
        self._waiting.pop(token, None)

    def wake(self, token: str) -> None:
        """Wake a waiter of this process without a round trip through Redis."""
        ev = self._waiting.get(token)
        if ev is not None:
            ev.set()

    async def ready(self, timeout: float) -> bool:
        """Start listening (once) and wait up to `timeout` s until subscribed. False while
        Redis is unreachable: the caller goes on and relies on its own timeout."""
        if self._task is None or self._task.done():
            self._task = self._spawn(self._listen())
        if self._subscribed.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        return self._subscribed.is_set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
                    if msg is not None and msg.get("type") == "message":
                        data = msg["data"]
                        self.wake(data.decode() if isinstance(data, bytes) else str(data))
            except REDIS_DOWN as e:
                # Messages published meanwhile are lost; waiters re-read at their timeout.
                self._subscribed.clear()
                log.warning("redis_mailbox_reconnecting", channel=self.channel, error=repr(e))
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # (redis-py untyped)
