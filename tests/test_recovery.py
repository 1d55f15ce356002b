"""Crash recovery and graceful shutdown, with the service as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from simulator.server import Simulator
from storage.db import create_engine, session_factory
from storage.models import Message
from tests.support import API_KEY, eventually, sse_events

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: asyncio.subprocess.Process | None = None
        self.base = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        env = {**os.environ, "SWARMDESK_API_KEY": API_KEY}
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "-c",
                str(self.config),
                "serve",
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"service exited: {self.log.read_text()[-2000:]}")
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"{self.base}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, timeout=30, every=0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)


@pytest.fixture
async def service_proc(tmp_path: Path, simulator: Simulator) -> AsyncIterator[ServiceProcess]:
    port = free_port()
    config = tmp_path / "swarmdesk.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": port, "shutdown_grace_seconds": 10},
                "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'sd.db'}"},
                "providers": [
                    {
                        "name": "sim",
                        "base_url": simulator.base_url,
                        "models": [{"name": "sim-a"}],
                    }
                ],
                "tiers": {"cheap": ["sim/sim-a"]},
                "log": {"format": "json", "level": "info"},
                "demo": {"allow": ["demo_shop", "demo_tools", "demo_site", "builtin_faq"]},
            }
        )
    )
    svc = ServiceProcess(config, port, tmp_path / "service.log")
    yield svc
    if svc.proc and svc.proc.returncode is None:
        svc.proc.kill()
        await svc.proc.wait()


async def stored_messages(db_file: Path) -> list[Message]:
    engine = create_engine(f"sqlite+aiosqlite:///{db_file}")
    try:
        async with session_factory(engine)() as s:
            return list((await s.execute(select(Message).order_by(Message.seq))).scalars())
    finally:
        await engine.dispose()


async def first_deltas(base: str, conversation_id: int, n: int) -> None:
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as c,
        c.stream(
            "GET",
            f"/api/v1/conversations/{conversation_id}/stream",
            params={"after": 0},
            headers={"X-Api-Key": API_KEY},
        ) as r,
    ):
        seen = 0
        async for ev in sse_events(r):
            if ev.event == "delta":
                seen += 1
                if seen >= n:
                    return


async def test_killed_mid_reply_the_message_gets_exactly_one_complete_answer(
    service_proc: ServiceProcess, simulator: Simulator, tmp_path: Path
) -> None:
    simulator.config.tokens_per_second = 10  # a reply long enough to kill it half-way
    simulator.config.reply_tokens = 60
    await service_proc.start()
    async with httpx.AsyncClient(base_url=service_proc.base) as c:
        r = await c.post(
            "/api/v1/messages",
            json={
                "contact_id": "kim",
                "text": "is the blue kettle in stock?",
                "client_message_id": "k1",
            },
            headers={"X-Api-Key": API_KEY},
        )
    cid, mid = r.json()["conversation_id"], r.json()["message_id"]
    await asyncio.wait_for(first_deltas(service_proc.base, cid, 3), 30)
    service_proc.signal(signal.SIGKILL)
    await service_proc.wait()

    rows = await stored_messages(tmp_path / "sd.db")
    assert [(m.direction, m.status) for m in rows] == [("in", "received"), ("out", "streaming")]

    simulator.config.tokens_per_second = 400
    await service_proc.start()  # the same database: recovery runs at start

    async def done() -> list[Message] | None:
        rows = await stored_messages(tmp_path / "sd.db")
        return rows if any(m.status == "sent" for m in rows) else None

    rows = await eventually(done, timeout=30)
    await asyncio.sleep(0.5)  # room for a wrong second answer
    rows = await stored_messages(tmp_path / "sd.db")
    answers = [m for m in rows if m.direction == "out"]
    assert [m.status for m in answers] == ["abandoned", "sent"]
    assert all(m.reply_to_id == mid for m in answers)
    assert answers[1].text and rows[0].status == "answered"

    # A client resuming from before the crash is told to drop the cut answer, then gets the
    # complete one.
    async with (
        httpx.AsyncClient(base_url=service_proc.base, timeout=30) as c,
        c.stream(
            "GET",
            f"/api/v1/conversations/{cid}/stream",
            headers={"X-Api-Key": API_KEY, "Last-Event-ID": "1-2.2"},
        ) as s,
    ):
        events = []
        async for ev in sse_events(s):
            events.append(ev)
            if ev.event == "final":
                break
    assert [(e.event, e.data["seq"]) for e in events] == [("error", 2), ("final", 3)]
    assert events[1].data["text"] == answers[1].text


async def test_sigterm_lets_the_answer_in_flight_finish(
    service_proc: ServiceProcess, simulator: Simulator, tmp_path: Path
) -> None:
    simulator.config.tokens_per_second = 20
    simulator.config.reply_tokens = 30  # ~1.5 s, well inside the 10 s grace period
    await service_proc.start()
    async with httpx.AsyncClient(base_url=service_proc.base) as c:
        r = await c.post(
            "/api/v1/messages",
            json={"contact_id": "lee", "text": "can I change my address?"},
            headers={"X-Api-Key": API_KEY},
        )
    await asyncio.wait_for(first_deltas(service_proc.base, r.json()["conversation_id"], 1), 30)
    service_proc.signal(signal.SIGTERM)
    assert await service_proc.wait() == 0
    rows = await stored_messages(tmp_path / "sd.db")
    assert [(m.direction, m.status) for m in rows] == [("in", "answered"), ("out", "sent")]
    assert "stopped" in service_proc.log.read_text()
