"""Runs units of work on the database: a unit is a plain function of a SQLAlchemy `Connection`
(Core statements), so one piece of code serves SQLite and PostgreSQL.

Why not the async engine everywhere: through aiosqlite every cursor call is a round trip to
the connection's thread (about four per statement), and each one waits for the busy event
loop and the GIL. With SQLite's single connection that turned a handful of statements into
tens of milliseconds of holding the only connection, and everything queued behind it. Here:

- SQLite: one writer thread owns the only connection that writes (SQLite has one writer
  anyway); a unit is one hop to it, run inside ``BEGIN IMMEDIATE`` so it takes the write
  lock up front and never fails half-way with SQLITE_BUSY. A few reader threads with
  read-only connections answer history, replay and lookups beside it: in WAL mode readers
  don't wait for the writer.
- PostgreSQL: the same in threads with psycopg (several writers: PostgreSQL has row
  locks), so a unit's round trips don't each wait for a turn of the event loop while the
  unit holds a pooled connection. Without psycopg, with asyncpg options in the URL, or for
  SQLite in memory (one connection must hold it): the async engine's pool, the unit run
  through `AsyncConnection.run_sync`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.sqlite_writer import SqliteWriter

T = TypeVar("T")

# Reader threads for SQLite: enough to overlap a replay with a history read; each costs a
# connection and its page cache.
SQLITE_READERS = 2
_BUSY_TIMEOUT_MS = 10_000


class Database(Protocol):
    async def write(self, unit: Callable[[Connection], T], *, urgent: bool = False) -> T:
        """Run `unit` in one transaction and commit (roll back if it raises). `urgent`:
        a shopper waits for it (the first delta does); it may go before others queued."""
        ...

    async def read(self, unit: Callable[[Connection], T]) -> T:
        """Run `unit` for reading only (it may see a slightly older state than a write
        that is committing at the same moment)."""
        ...

    async def close(self) -> None: ...


class AsyncEngineDatabase:
    """Units on the async engine's pool (the fallback: see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Reads need no transaction: no BEGIN/ROLLBACK round trips around them.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def write(self, unit: Callable[[Connection], T], *, urgent: bool = False) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(unit)

    async def read(self, unit: Callable[[Connection], T]) -> T:
        async with self._reader.connect() as conn:
            return await conn.run_sync(unit)

    async def close(self) -> None:
        return None  # the engine belongs to the caller


class ThreadedDatabase:
    """Writer threads and reader threads, each holding its own connection for its life."""

    def __init__(
        self,
        write_engine: Engine,
        read_engine: Engine,
        *,
        writers: int,
        readers: int,
        name: str,
    ) -> None:
        self._write_engine = write_engine
        self._read_engine = read_engine
        self._local = threading.local()
        self._writer = ThreadPoolExecutor(writers, thread_name_prefix=f"{name}-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix=f"{name}-reader")
        self._opened: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self, engine: Engine) -> Connection:
        # One connection per thread for the thread's whole life: no pool checkout per unit.
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = engine.connect()
            with self._lock:
                self._opened.append(conn)
        return conn

    def _write(self, unit: Callable[[Connection], T]) -> T:
        conn = self._connection(self._write_engine)
        with conn.begin():
            return unit(conn)

    def _read(self, unit: Callable[[Connection], T]) -> T:
        conn = self._connection(self._read_engine)
        try:
            return unit(conn)
        finally:
            conn.rollback()  # ends the autobegun (no-op in autocommit) transaction

    async def write(self, unit: Callable[[Connection], T], *, urgent: bool = False) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._write, unit)

    async def read(self, unit: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, unit)

    async def close(self) -> None:
        """Wait for the units under way, then close the connections."""
        if self._closed:
            return
        self._closed = True

        def stop() -> None:
            self._writer.shutdown(wait=True)
            self._readers.shutdown(wait=True)
            # No thread uses them any more, so they may be closed from this one.
            for conn in self._opened:
                conn.close()
            self._write_engine.dispose()
            self._read_engine.dispose()

        await asyncio.get_running_loop().run_in_executor(None, stop)


class SqliteThreads(ThreadedDatabase):
    """One writer thread (SQLite has one writer: storage/sqlite_writer.py, which puts
    urgent units first and commits units that waited together at once), read-only reader
    threads beside it."""

    def __init__(self, url: str, readers: int = SQLITE_READERS) -> None:
        sync_url = make_url(url).set(drivername="sqlite+pysqlite")
        write_engine = _sqlite_engine(sync_url, pool_size=1, read_only=False)
        super().__init__(
            write_engine,
            _sqlite_engine(sync_url, pool_size=readers, read_only=True),
            writers=1,  # (unused: the SqliteWriter writes)
            readers=readers,
            name="sqlite",
        )
        self._sqlite_writer = SqliteWriter(write_engine, "BEGIN IMMEDIATE")

    async def write(self, unit: Callable[[Connection], T], *, urgent: bool = False) -> T:
        return await self._sqlite_writer.submit(unit, urgent=urgent)

    async def close(self) -> None:
        if not self._closed:
            await asyncio.get_running_loop().run_in_executor(None, self._sqlite_writer.stop)
        await super().close()


class PostgresThreads(ThreadedDatabase):
    """PostgreSQL through psycopg in threads: a unit's round trips (BEGIN, its statements,
    COMMIT) wait in its thread instead of each waiting for a turn of the busy event loop
    while it holds a pooled connection."""

    def __init__(self, url: URL, writers: int, readers: int) -> None:
        sync_url = url.set(drivername="postgresql+psycopg")
        super().__init__(
            create_engine(sync_url, pool_size=writers, max_overflow=0, pool_pre_ping=True),
            create_engine(
                sync_url,
                pool_size=readers,
                max_overflow=0,
                pool_pre_ping=True,
                isolation_level="AUTOCOMMIT",  # reads need no BEGIN/ROLLBACK round trips
            ),
            writers=writers,
            readers=readers,
            name="pg",
        )


def _sqlite_engine(url: Any, *, pool_size: int, read_only: bool) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        # Connections stay with their thread; the flag only allows closing them elsewhere.
        connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine, "connect")
    def _setup(dbapi_conn: Any, _record: Any) -> None:
        # We say when transactions begin (the driver's implicit BEGIN would be deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.execute("PRAGMA cache_size=-16000")  # KiB: 16 MB of page cache per connection
        if read_only:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    return engine


def for_engine(engine: AsyncEngine, pool_size: int = 10) -> Database:
    """The way to run units on `engine`'s database (see the module's docstring). On
    PostgreSQL up to twice `pool_size` threads write (as many connections as the async
    engine's pool may open: a unit mostly waits for round trips and commits, so more of
    them at once hide that), half `pool_size` read."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SqliteThreads(url.render_as_string(hide_password=False))
    if url.get_backend_name() == "postgresql" and not url.query and _has_psycopg():
        # (Driver options in the URL are asyncpg's: then the async engine it is.)
        return PostgresThreads(url, writers=2 * pool_size, readers=max(2, pool_size // 2))
    return AsyncEngineDatabase(engine)


def _has_psycopg() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True
