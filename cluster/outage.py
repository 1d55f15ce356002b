"""Redis unreachable: how a shared part falls back to its local behaviour for a while.

A part whose correctness does not hang on Redis (a rate limit, a breaker, a sign-in limit)
keeps working on its in-process state while Redis is down. `Outage` tells it when to try
Redis again, bounds how long one try may take, and logs the outage once (and the recovery
once) instead of once per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import structlog

from cluster.redis import REDIS_DOWN

log = structlog.get_logger(__name__)

T = TypeVar("T")

# After a failed try, Redis is left alone this long (a restart takes a second or two; asking
# on every call would add a connect timeout to each of them).
RETRY_AFTER_S = 1.0
# The longest a hot-path call to Redis may take before the local fallback answers instead.
CALL_TIMEOUT_S = 1.0


class RedisUnavailable(Exception):
    """Redis did not answer (or is being left alone after it did not): use the fallback."""


class Outage:
    """Whether Redis may be asked now, for one shared part (`what` names it in the logs)."""

    def __init__(
        self,
        what: str,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self.down_since: float | None = None  # monotonic; None while Redis answers
        self._next_try = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    async def call(self, op: Awaitable[T]) -> T:
        """`op`'s result, or RedisUnavailable when Redis is down, slow, or being left alone
        (then `op` is not awaited: it is closed)."""
        if self.down_since is not None and time.monotonic() < self._next_try:
            _discard(op)
            raise RedisUnavailable(self.what)
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await op
        except (*REDIS_DOWN, TimeoutError) as e:
            self.failed(e)
            raise RedisUnavailable(self.what) from e
        self.recovered()
        return result

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_after_s
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "redis_unavailable",
                part=self.what,
                error=repr(error),
                detail="working on this process's own state until Redis answers again",
            )

    def recovered(self) -> None:
        if self.down_since is not None:
            log.info(
                "redis_available_again",
                part=self.what,
                down_seconds=round(time.monotonic() - self.down_since, 1),
            )
            self.down_since = None


def _discard(op: Awaitable[T]) -> None:
    close = getattr(op, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: closed, so no "never awaited" warning
