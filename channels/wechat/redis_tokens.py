"""access_tokens shared by several swarmdesk processes through Redis (queue.backend: redis).

The token lives in Redis until it expires; a fetch of a new one happens under a Redis lock,
so concurrent callers on every process wait for that one fetch and read its result; a token
the platform refused is deleted for everyone (compare-and-delete, so a newer one stays).

While Redis cannot be reached, each process falls back to its own copy: it keeps using the
token it last saw, or fetches one itself (logged by `Outage`). That costs at most a token
fetch per process, never a refused call.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import structlog
from redis.asyncio import Redis

from channels.wechat.tokens import InProcessTokenStore, Token
from cluster.outage import Outage, RedisUnavailable
from cluster.redis import REDIS_DOWN, Keys
from cluster.renewed_lock import renewed_lock

log = structlog.get_logger(__name__)

# A fetch is one HTTP exchange (10 s timeout, a few quick retries): the lock outlives it, and
# a process waiting for another's fetch gives up after about two of them and fetches itself.
FETCH_LEASE_S = 30.0
FETCH_WAIT_S = 25.0

# KEYS[1]: the token; ARGV[1]: the refused value. Deletes it only if it is still that one.
_DISCARD = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['v'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTokenStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._local = InProcessTokenStore()  # what this process last saw: the fallback
        self._discard = redis.register_script(_DISCARD)
        self.outage = Outage("wechat_tokens")

    def _key(self, key: str) -> str:
        return self._keys("wx_token", key)

    async def get(self, key: str) -> Token | None:
        try:
            raw = await self.outage.call(self._redis.get(self._key(key)))
        except RedisUnavailable:
            return await self._local.get(key)
        if raw is None:
            return None
        data = json.loads(raw)
        token = Token(str(data["v"]), float(data["e"]), float(data["r"]))
        await self._local.put(key, token)
        return token

    async def put(self, key: str, token: Token) -> None:
        await self._local.put(key, token)
        raw = json.dumps({"v": token.value, "e": token.expires_at, "r": token.refresh_at})
        ttl_ms = max(1, int((token.expires_at - time.time()) * 1000))
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(self._redis.set(self._key(key), raw, px=ttl_ms))

    async def discard(self, key: str, value: str) -> None:
        await self._local.discard(key, value)
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(self._discard(keys=[self._key(key)], args=[value]))

    def exclusive(self, key: str) -> AbstractAsyncContextManager[None]:
        return self._exclusive(key)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        if self.outage.down:  # the read before this one failed: no lock to be had
            log.warning("wechat_token_local_fetch", account=key, reason="redis unavailable")
            yield
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(
                    renewed_lock(
                        self._redis,
                        self._keys("wx_token_fetch", key),
                        lease_s=FETCH_LEASE_S,
                        wait_s=FETCH_WAIT_S,
                    )
                )
            except REDIS_DOWN as e:
                self.outage.failed(e)
                log.warning("wechat_token_local_fetch", account=key, reason="redis unavailable")
            else:
                if held is None:
                    log.warning(
                        "wechat_token_local_fetch",
                        account=key,
                        reason=f"another process held the fetch lock over {FETCH_WAIT_S:.0f} s",
                    )
            yield
