"""Fixtures: the model simulator, a fresh database (SQLite file or PostgreSQL), the service."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot import logging as logs
from bot.settings import Settings
from simulator.config import SimulatorConfig
from simulator.server import Simulator
from tests.support import API_KEY, RunningService, start_service

PG_ADMIN_DSN = os.environ.get("SWARMDESK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

logs.configure("console", "warning")


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMDESK_API_KEY", API_KEY)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """A fast simulator: tests wait for answers, they don't time them."""
    sim = Simulator(SimulatorConfig(first_token_ms=20, tokens_per_second=400, reply_tokens=12))
    await sim.start()
    yield sim
    await sim.stop()


async def create_pg_database() -> str:
    name = f"swarmdesk_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def pg_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database of each kind swarmdesk supports."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'swarmdesk.db'}"
        return
    name = await create_pg_database()
    try:
        yield pg_url(name)
    finally:
        await drop_pg_database(name)


@pytest.fixture
async def pg() -> AsyncIterator[str]:
    """A fresh PostgreSQL database only (what several processes share)."""
    name = await create_pg_database()
    try:
        yield pg_url(name)
    finally:
        await drop_pg_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'swarmdesk.db'}"


def simulator_models(sim_url: str) -> dict[str, Any]:
    """`providers` and `tiers`: two simulator-backed models in both chains."""
    return {
        "providers": [
            {
                "name": "sim",
                "base_url": sim_url,
                "first_token_timeout_seconds": 5,
                "models": [
                    {"name": "sim-a", "input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0},
                    {"name": "sim-b", "input_price_per_mtok": 3.0, "output_price_per_mtok": 6.0},
                ],
            }
        ],
        # Both chains two deep, so every turn can fall back whatever tier routing picks.
        "tiers": {"cheap": ["sim/sim-a", "sim/sim-b"], "premium": ["sim/sim-a", "sim/sim-b"]},
    }


def make_settings(db: str, sim_url: str, **overrides: Any) -> Settings:
    """Service settings with two simulator-backed models in the cheap chain."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 5},
        "database": {"url": db},
        **simulator_models(sim_url),
        "reply": {"turn_deadline_seconds": 15},
        # Naming a provider makes this a real deployment: the tests keep the demo's parts.
        "demo": {"allow": ["demo_shop", "demo_tools", "demo_site", "builtin_faq"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings(**data)


@pytest.fixture
def settings_factory(simulator: Simulator) -> Callable[..., Settings]:
    def factory(db: str, **overrides: Any) -> Settings:
        return make_settings(db, simulator.base_url or "", **overrides)

    return factory


@pytest.fixture
async def service(
    db_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    """The service on a free port, on SQLite and on PostgreSQL."""
    svc = await start_service(settings_factory(db_url))
    yield svc
    await svc.stop()


@pytest.fixture
async def sqlite_service(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    """The service on SQLite only (for tests about behaviour, not storage)."""
    svc = await start_service(settings_factory(sqlite_url))
    yield svc
    await svc.stop()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the machine's Redis; its keys are deleted after the test."""
    from tests.redis_support import REDIS_URL, delete_prefix, fresh_prefix

    prefix = fresh_prefix()
    yield prefix
    await delete_prefix(REDIS_URL, prefix)


@pytest.fixture
async def unhedged_service(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    """A service on SQLite whose model calls are never hedged (tests that count calls)."""
    s = await start_service(settings_factory(sqlite_url, resilience={"hedge_after_seconds": None}))
    yield s
    await s.stop()
