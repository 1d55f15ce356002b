"""A Redis lock held for as long as its holder works, whatever that takes.

redis-py's `Lock` expires after its timeout so that a holder that died frees it; a holder
that is alive but slow would lose it the same way. `renewed_lock` takes a short lease and
extends it every third of the lease while the work goes on: a process that dies (or hangs)
lets go within one lease, a live one keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from cluster.redis import REDIS_DOWN

log = structlog.get_logger(__name__)


class Held:
    """What the holder may ask while it works: whether the lease was lost (Redis restarted, or
    this process stalled longer than the lease and another took over)."""

    def __init__(self) -> None:
        self.lost = False


@contextlib.asynccontextmanager
async def renewed_lock(
    redis: Redis, name: str, *, lease_s: float = 15.0, wait_s: float | None = None
) -> AsyncIterator[Held | None]:
    """Hold the lock `name` (waiting up to `wait_s`, None: as long as it takes) and keep it
    while the body runs. Yields None when it could not be had within `wait_s`. Raises what
    Redis raises when it cannot be asked at all (callers decide how to go on without it)."""
    lock = Lock(
        redis,
        name,
        timeout=lease_s,
        blocking=True,
        blocking_timeout=wait_s,
        thread_local=False,
        raise_on_release_error=False,
    )
    if not await lock.acquire():
        yield None
        return
    held = Held()
    keeper = asyncio.create_task(_keep(lock, lease_s, held, name))
    try:
        yield held
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        with contextlib.suppress(LockError, *REDIS_DOWN):
            await lock.release()


async def _keep(lock: Lock, lease_s: float, held: Held, name: str) -> None:
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            await lock.extend(lease_s, replace_ttl=True)
        except LockError:
            # Gone (a Redis restart) or taken after a stall: try to get it back, once a round.
            try:
                if not await lock.acquire(blocking=False, token=lock.local.token):
                    if not held.lost:
                        log.warning("lock_lost", lock=name)
                    held.lost = True
            except REDIS_DOWN:
                held.lost = True
        except REDIS_DOWN as e:
            log.info("lock_not_renewed", lock=name, error=repr(e))
