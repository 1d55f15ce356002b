"""Locks per key (a chat, while its first message opens the conversation). `LockStore` is
the interface; `KeyedLocks` the in-process implementation (a Redis one can stand beside it for
several processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol


class LockStore(Protocol):
    def hold(self, key: Hashable) -> AbstractAsyncContextManager[None]:
        """Hold the lock of `key` for the `async with` block."""
        ...


class KeyedLocks:
    """asyncio locks that disappear when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
