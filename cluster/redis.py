"""Connections to Redis and the names of swarmdesk's keys in it.

Every key starts with `queue.key_prefix` so that one Redis can serve several shops (and tests
can use a fresh prefix each run and delete what they made)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# The start of a Lua script that needs the time: `now`, Redis's clock in ms, one clock for
# every process's deadlines and windows.
LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# What a Redis restart or a network cut raises; callers that can wait it out catch these.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def open_redis(url: str, *, socket_timeout: float = 5.0) -> Redis:
    """A client with a pool: reconnects by itself after a Redis restart (a few quick retries,
    then the caller sees the error)."""
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def process_name() -> str:
    """This process among the others, in logs and in Redis: host, pid and a random tail (a
    restarted process with a reused pid is still another one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under the prefix: `keys("lease", 3)` -> b"swarmdesk:lease:3"."""

    prefix: str

    def __call__(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))


@dataclass(slots=True)
class RedisParts:
    """The distributed mode's connections, made once per process and shared."""

    queue: Redis
    bus: Redis
    state: Redis
    keys: Keys
    process: str = field(default_factory=process_name)

    @classmethod
    def connect(cls, queue_url: str, bus_url: str, state_url: str, prefix: str) -> RedisParts:
        made: dict[str, Redis] = {}

        def client(url: str) -> Redis:
            if url not in made:
                made[url] = open_redis(url)
            return made[url]

        return cls(client(queue_url), client(bus_url), client(state_url), Keys(prefix))

    async def aclose(self) -> None:
        for r in {id(c): c for c in (self.queue, self.bus, self.state)}.values():
            await r.aclose()


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a throw-away prefix of a test or a benchmark run)."""
    r = Redis.from_url(url)
    try:
        async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            await r.delete(key)
    finally:
        await r.aclose()
