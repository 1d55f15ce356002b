"""The thread that owns SQLite's only write connection (see storage/executor.py).

Two things a plain one-thread pool doesn't do:
- Urgent units first. A shopper's new message (its store is what the POST and the first
  delta wait for) goes before the bookkeeping of finished answers queued ahead of it.
- Units that waited together commit together: one BEGIN IMMEDIATE ... COMMIT around all
  of them, each in a savepoint of its own so a unit that fails (a redelivery hitting the
  unique key) is undone alone; and one wake-up of the event loop for all their results.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")

# At most this many units share a transaction (bounds how long a commit keeps results).
MAX_BATCH = 32
_URGENT, _NORMAL, _STOP = 0, 1, 2


@dataclass(slots=True)
class _Job:
    unit: Callable[[Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


Outcome = tuple[_Job, Any, BaseException | None]


class SqliteWriter:
    def __init__(self, engine: Engine, begin_sql: str = "BEGIN IMMEDIATE") -> None:
        self._engine = engine
        self._begin_sql = begin_sql
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among units of one priority
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, unit: Callable[[Connection], T], *, urgent: bool) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
                self._thread.start()
        job = _Job(unit, future, loop)
        self._queue.put((_URGENT if urgent else _NORMAL, next(self._order), job))
        return future

    def stop(self) -> None:
        """Run what is queued, then end the thread (blocking: call it from a thread)."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        self._queue.put((_STOP, next(self._order), None))
        thread.join()

    def _run(self) -> None:
        conn = self._engine.connect()
        try:
            while True:
                _, _, job = self._queue.get()
                if job is None:
                    return
                batch = [job]
                while len(batch) < MAX_BATCH:
                    try:
                        priority, order, more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put((priority, order, None))  # stop after this batch
                        break
                    batch.append(more)
                self._settle(self._run_batch(conn, batch))
        finally:
            conn.close()

    def _run_batch(self, conn: Connection, batch: list[_Job]) -> list[Outcome]:
        driver: Any = conn.connection.driver_connection
        outcomes: list[Outcome] = []
        try:
            # The dialect's begin is a no-op (the driver is in autocommit mode): we say
            # BEGIN IMMEDIATE, which takes the write lock up front; its commit commits.
            with conn.begin():
                driver.execute(self._begin_sql)
                if len(batch) == 1:
                    outcomes.append((batch[0], batch[0].unit(conn), None))
                else:
                    for job in batch:
                        outcomes.append(self._run_in_savepoint(conn, driver, job))
        except Exception as e:
            # BEGIN or COMMIT failed, or the only unit raised: nothing was kept.
            return [(job, None, e) for job in batch]
        return outcomes

    @staticmethod
    def _run_in_savepoint(conn: Connection, driver: Any, job: _Job) -> Outcome:
        driver.execute("SAVEPOINT unit")
        try:
            result = job.unit(conn)
        except Exception as e:
            driver.execute("ROLLBACK TO unit")
            driver.execute("RELEASE unit")
            return (job, None, e)
        driver.execute("RELEASE unit")
        return (job, result, None)

    @staticmethod
    def _settle(outcomes: list[Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, mine in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, mine)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more


def _resolve(outcomes: list[Outcome]) -> None:
    for job, result, error in outcomes:
        if job.future.cancelled():
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
