"""A throw-away PostgreSQL database for `--db postgres`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


@contextlib.asynccontextmanager
async def temporary_postgres_db(admin_dsn: str, name: str) -> AsyncIterator[str]:
    """Create database `name` through `admin_dsn` (trust auth) and drop it afterwards.

    Yields the SQLAlchemy URL of the new database (asyncpg driver).
    """
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_dsn)
    url = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))
    try:
        yield url
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
