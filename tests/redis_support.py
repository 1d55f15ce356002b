"""Redis for the tests of the distributed mode: the machine's server under a fresh key prefix
(deleted afterwards), or a private redis-server a test may stop and restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis.asyncio import Redis

from cluster.redis import delete_prefix as delete_prefix

REDIS_URL = os.environ.get("SWARMDESK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def fresh_prefix() -> str:
    return f"sdtest-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, without persistence: `restart()` loses everything,
    as a Redis restart without AOF does in production."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - starts at once, nothing to wait for
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                r = Redis.from_url(self.url)
                await r.ping()
                await r.aclose()
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    async def restart(self) -> None:
        self.stop()
        await self.start()


@asynccontextmanager
async def private_redis(workdir: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    await server.start()
    try:
        yield server
    finally:
        server.stop()
