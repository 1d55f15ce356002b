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
- PostgreSQL (and SQLite in memory, which one connection must hold): the async engine's
  pool, the unit run through `AsyncConnection.run_sync`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
_STATS: list = []
Unit = Callable[[Connection], T]

# Reader threads for SQLite: enough to overlap a replay with a history read; each costs a
# connection and its page cache.
SQLITE_READERS = 2
_BUSY_TIMEOUT_MS = 10_000


class Database(Protocol):
    async def write(self, unit: Callable[[Connection], T]) -> T:
        """Run `unit` in one transaction and commit (roll back if it raises)."""
        ...

    async def read(self, unit: Callable[[Connection], T]) -> T:
        """Run `unit` for reading only (it may see a slightly older state than a write
        that is committing at the same moment)."""
        ...

    async def close(self) -> None: ...


class AsyncEngineDatabase:
    """Units on the async engine's pool (PostgreSQL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Reads need no transaction: no BEGIN/ROLLBACK round trips around them.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def write(self, unit: Callable[[Connection], T]) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(unit)

    async def read(self, unit: Callable[[Connection], T]) -> T:
        async with self._reader.connect() as conn:
            return await conn.run_sync(unit)

    async def close(self) -> None:
        return None  # the engine belongs to the caller


class SqliteThreads:
    """A writer thread and reader threads, each holding its own sqlite3 connection."""

    def __init__(self, url: str, readers: int = SQLITE_READERS) -> None:
        sync_url = make_url(url).set(drivername="sqlite+pysqlite")
        self._write_engine = _sqlite_engine(sync_url, pool_size=1, read_only=False)
        self._read_engine = _sqlite_engine(sync_url, pool_size=readers, read_only=True)
        self._local = threading.local()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
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
            # BEGIN IMMEDIATE takes the write lock up front; straight to the driver (the
            # dialect's own begin is a no-op here, its commit commits this transaction).
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            return unit(conn)

    def _read(self, unit: Callable[[Connection], T]) -> T:
        conn = self._connection(self._read_engine)
        try:
            return unit(conn)
        finally:
            conn.rollback()  # ends the autobegun (no-op in autocommit) transaction

    async def write(self, unit: Callable[[Connection], T]) -> T:
        import time, os, sys
        if os.environ.get("EXP_SWITCH") and not getattr(SqliteThreads, "_sw", False):
            SqliteThreads._sw = True
            sys.setswitchinterval(float(os.environ["EXP_SWITCH"]))
        t0 = time.perf_counter()
        box = []
        def timed(conn):
            t1 = time.perf_counter()
            r = unit(conn)
            box.append((t1, time.perf_counter()))
            return r
        r = await asyncio.get_running_loop().run_in_executor(self._writer, self._write, timed)
        t3 = time.perf_counter()
        _STATS.append((box[0][0]-t0, box[0][1]-box[0][0], t3-box[0][1]))
        return r

    async def read(self, unit: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, unit)

    async def close(self) -> None:
        """Wait for the units under way, then close the connections."""
        import sys, statistics
        if _STATS:
            for i, name in enumerate(("queue", "run", "return")):
                v = sorted(x[i] for x in _STATS)
                print("EXPSTAT", name, "p50 %.2f p90 %.2f p99 %.2f ms" % (v[len(v)//2]*1e3, v[int(len(v)*.9)]*1e3, v[int(len(v)*.99)]*1e3), file=sys.stderr)
        if self._closed:
            return
        self._closed = True

        def stop() -> None:
            self._writer.shutdown(wait=True)
            self._readers.shutdown(wait=True)
            # No thread uses them any more (check_same_thread=False lets us close them here).
            for conn in self._opened:
                conn.close()
            self._write_engine.dispose()
            self._read_engine.dispose()

        await asyncio.get_running_loop().run_in_executor(None, stop)


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


def for_engine(engine: AsyncEngine) -> Database:
    """The way to run units on `engine`'s database (see the module's docstring)."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SqliteThreads(url.render_as_string(hide_password=False))
    return AsyncEngineDatabase(engine)
