"""access_token handling: one refresher per account, a lock, refreshed before it expires.

The cache is behind `TokenStore`: in-process while one process serves everything, in Redis
when several do (redis_tokens.py). WeChat allows only a few token fetches a day and a new
classic token invalidates the old one, so across processes one fetches at a time
(`TokenStore.exclusive`) and the others read what it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

# Refresh this long before the platform's expiry, so no call goes out with a dying token.
REFRESH_MARGIN_S = 300.0


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # time.time() seconds
    refresh_at: float  # a little earlier: renew from then on


class TokenStore(Protocol):
    async def get(self, key: str) -> Token | None: ...

    async def put(self, key: str, token: Token) -> None: ...

    async def discard(self, key: str, value: str) -> None:
        """The platform refused `value`: nobody may hand it out any more (if it is stored)."""
        ...

    def exclusive(self, key: str) -> AbstractAsyncContextManager[None]:
        """Held while a new token is fetched, so that one fetch runs at a time across all
        the processes sharing the store."""
        ...


class InProcessTokenStore:
    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    async def get(self, key: str) -> Token | None:
        return self._tokens.get(key)

    async def put(self, key: str, token: Token) -> None:
        self._tokens[key] = token

    async def discard(self, key: str, value: str) -> None:
        token = self._tokens.get(key)
        if token is not None and token.value == value:
            del self._tokens[key]

    def exclusive(self, key: str) -> AbstractAsyncContextManager[None]:
        # One process: `AccessToken`'s own lock is all there is to hold.
        return contextlib.nullcontext()


# Fetches a token from the platform: (token, expires_in seconds). `force` asks for a new one
# even if the platform still considers the current one valid.
Fetch = Callable[[bool], Awaitable[tuple[str, float]]]


class AccessToken:
    """The access_token of one account."""

    def __init__(self, key: str, fetch: Fetch, store: TokenStore) -> None:
        self.key = key
        self._fetch = fetch
        self._store = store
        self._lock = asyncio.Lock()
        self.fetches = 0

    def _fresh(self, token: Token | None) -> bool:
        return token is not None and token.refresh_at > time.time()

    async def get(self) -> str:
        token = await self._store.get(self.key)
        if self._fresh(token):
            assert token is not None
            return token.value
        async with self._lock:
            token = await self._store.get(self.key)  # another caller may have refreshed it
            if self._fresh(token):
                assert token is not None
                return token.value
            async with self._store.exclusive(self.key):
                token = await self._store.get(self.key)  # ... or another process
                if self._fresh(token):
                    assert token is not None
                    return token.value
                return await self._renew(force=False)

    async def refresh(self, rejected: str) -> str:
        """The platform rejected `rejected` (expired or invalidated): a token it accepts."""
        # Out of the store at once: no other caller (or process) is handed it meanwhile.
        await self._store.discard(self.key, rejected)
        async with self._lock:
            token = await self._store.get(self.key)
            if token is not None and token.value != rejected and self._fresh(token):
                return token.value  # refreshed meanwhile by another call
            async with self._store.exclusive(self.key):
                token = await self._store.get(self.key)
                if token is not None and token.value != rejected and self._fresh(token):
                    return token.value  # ... or by another process
                value = await self._renew(force=False)
                if value == rejected:
                    # The platform still hands out the token it just refused: a new one.
                    value = await self._renew(force=True)
                return value

    async def _renew(self, *, force: bool) -> str:
        value, expires_in = await self._fetch(force)
        self.fetches += 1
        now = time.time()
        margin = min(REFRESH_MARGIN_S, expires_in / 4)
        await self._store.put(self.key, Token(value, now + expires_in, now + expires_in - margin))
        log.info("wechat_token_refreshed", account=self.key, expires_in=expires_in, force=force)
        return value
