"""`swarmdesk serve --workers N` as a user runs it: a real subprocess with its children on one
port, PostgreSQL and Redis (queue.backend: redis) and the model simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bot.supervisor import Supervisor
from simulator.server import Simulator
from tests.conftest import create_pg_database, drop_pg_database, pg_url
from tests.redis_support import REDIS_URL, free_port
from tests.support import API_KEY, eventually

HEADERS = {"X-Api-Key": API_KEY}
SERVE = (sys.executable, "-m", "bot.cli")


def _config(tmp_path: Path, port: int, db: str, sim_url: str, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 5},
        "database": {"url": db},
        "providers": [
            {
                "name": "sim",
                "base_url": sim_url,
                "first_token_timeout_seconds": 5,
                "models": [{"name": "sim-a", "input_price_per_mtok": 1.0}],
            }
        ],
        "tiers": {"cheap": ["sim/sim-a"], "premium": ["sim/sim-a"]},
        "demo": {"allow": ["demo_shop", "demo_tools", "demo_site", "builtin_faq"]},
        "log": {"format": "json", "level": "info"},
        **extra,
    }
    path = tmp_path / "swarmdesk.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    return path


@dataclass
class Group:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")


def _start(config: Path, workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [*SERVE, "--config", str(config), "serve", "--workers", str(workers)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )


async def _exit_code(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    code = await eventually(lambda: _polled(proc), timeout=timeout, every=0.1)
    return int(code) - 1000


async def _polled(proc: subprocess.Popen[bytes]) -> int | None:
    code = proc.poll()
    return None if code is None else code + 1000  # truthy, also for exit status 0


@pytest.fixture
async def group(tmp_path: Path, simulator: Simulator, redis_prefix: str) -> AsyncIterator[Group]:
    """`serve --workers 2` on a fresh PostgreSQL database and a fresh Redis key prefix."""
    name = await create_pg_database()
    port = free_port()
    config = _config(
        tmp_path,
        port,
        pg_url(name),
        simulator.base_url or "",
        queue={"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix},
    )
    log_path = tmp_path / "serve.log"
    proc = _start(config, 2, log_path)
    g = Group(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        yield g
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await drop_pg_database(name)


async def _ready_process(base_url: str) -> str | None:
    """The process that answered /readyz on a new connection, once it is ready."""
    try:
        # A new connection each time: the kernel picks a child per connection.
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as c:
            r = await c.get("/readyz")
    except httpx.TransportError:
        return None
    return str(r.json()["process"]) if r.status_code == 200 else None


async def _processes(base_url: str, want: int, timeout: float = 90) -> set[str]:
    seen: set[str] = set()

    async def probe() -> set[str] | None:
        if (p := await _ready_process(base_url)) is not None:
            seen.add(p)
        return seen if len(seen) >= want else None

    return await eventually(probe, timeout=timeout, every=0.02)


def _pid(process: str) -> int:
    return int(process.rsplit(":", 1)[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_two_workers_share_the_port_answer_restart_and_stop(group: Group) -> None:
    try:
        processes = await _processes(group.base_url, 2)
    except AssertionError:
        raise AssertionError("both children did not answer; log:\n" + group.log()) from None
    pids = {_pid(p) for p in processes}
    assert group.proc.pid not in pids, "the parent serves nothing itself"

    async with httpx.AsyncClient(base_url=group.base_url, timeout=30, headers=HEADERS) as c:
        r = await c.post(
            "/api/v1/messages",
            json={"contact_id": "ann", "text": "hello there", "client_message_id": "w-1"},
        )
        assert r.status_code == 202, r.text
        cid, mid = r.json()["conversation_id"], r.json()["message_id"]

        async def answer() -> dict[str, Any] | None:
            got = await c.get(f"/api/v1/conversations/{cid}/messages")
            for m in got.json()["messages"]:
                if m["reply_to_id"] == mid and m["status"] == "sent":
                    return dict(m)
            return None

        assert (await eventually(answer, timeout=30))["text"]

    # A child that dies is replaced: sample until a process the group did not have answers.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    async def newcomer() -> str | None:
        p = await _ready_process(group.base_url)
        return p if p is not None and p not in processes else None

    pids.add(_pid(await eventually(newcomer, timeout=90, every=0.05)))
    assert "worker_died" in group.log()

    group.proc.send_signal(signal.SIGTERM)
    assert await _exit_code(group.proc) == 0, group.log()
    assert not [pid for pid in pids if _alive(pid)], "every child stopped with the parent"


async def test_workers_need_the_redis_backend(tmp_path: Path, simulator: Simulator) -> None:
    config = _config(
        tmp_path,
        free_port(),
        f"sqlite+aiosqlite:///{tmp_path / 'swarmdesk.db'}",
        simulator.base_url or "",
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bot.cli", "--config", str(config), "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "set queue.backend: redis" in done.stderr
    assert "PostgreSQL" in done.stderr


def _exiting(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


async def test_children_that_keep_crashing_at_start_stop_the_group() -> None:
    sup = Supervisor(
        2, lambda slot: _exiting(3), stop_grace_s=1, backoff_s=(0.01, 0.05), max_start_crashes=3
    )
    assert await sup.run() == 1


async def test_a_child_refusing_its_configuration_stops_the_group_at_once() -> None:
    sup = Supervisor(2, lambda slot: _exiting(2), stop_grace_s=1, backoff_s=(10.0, 10.0))
    assert await sup.run() == 2
