"""Locks per key (a chat, while its first message opens the conversation). `LockStore` is
the interface; `KeyedLocks` the in-process implementation (a Redis one can stand beside it for
several processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class HeldLock:
    """A lock held in Redis (its key and this holder's token), which the work queue may free
    together with queueing the message (`released` then)."""

    name: str
    token: str
    released: bool = False


class LockStore(Protocol):
    def hold(self, key: Hashable) -> AbstractAsyncContextManager[HeldLock | None]:
        """Hold the lock of `key` for the `async with` block (a Redis lock: as a `HeldLock`;
        None in one process, or when it could not be had)."""
        ...


class KeyedLocks:
    """asyncio locks that disappear when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[HeldLock | None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield None
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
