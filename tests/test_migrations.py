"""Alembic is the only source of the schema, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from storage import db
from storage.models import Base


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


def _downgrade(conn: Connection, url: str) -> None:
    cfg = db.alembic_config(url)
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, "base")


async def test_upgrade_head_matches_models_and_downgrades(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.upgrade(engine)
        assert await db.at_head(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, db_url)
        assert not await db.at_head(engine)
        await db.upgrade(engine)  # and back up again
        assert await db.at_head(engine)
    finally:
        await engine.dispose()
