"""Per-conversation work queue: one conversation's messages in order, one at a time;
different conversations concurrently (DESIGN.md, Data flow step 3).

`InProcessQueue` is the embedded implementation. The Redis one (scale-out) implements the
same `WorkQueue` protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Protocol

import structlog

from bot.locks import HeldLock
from storage.fences import Fence

log = structlog.get_logger(__name__)

Handler = Callable[[int, int], Awaitable[None]]  # (conversation_id, message_id)


class Lease(Protocol):
    """The right to work a conversation, held by one process of several (redis backend)."""

    @property
    def fence(self) -> Fence: ...

    def valid(self) -> bool:
        """Surely still held: renewed in time and not taken over."""
        ...

    def held(self) -> bool:
        """Not known to be lost (a late renewal may still come)."""
        ...


# The lease the current turn runs under (None: one process, nobody to share with). The worker
# sends only while it is valid and stores the answer under its fence.
WORK_LEASE: ContextVar[Lease | None] = ContextVar("work_lease", default=None)


class WorkQueue(Protocol):
    def start(self, handler: Handler) -> None: ...

    async def put(
        self, conversation_id: int, message_id: int, unlock: HeldLock | None = None
    ) -> None:
        """Queue a stored message; `unlock`: the chat's lock ingest holds, which the queue
        may free together with queueing it."""
        ...

    async def drain(self, grace_s: float) -> bool:
        """Stop taking new work, wait for what is running; False if time ran out."""
        ...

    def pending(self) -> int: ...

    def here(self, conversation_id: int) -> bool:
        """This process works the conversation now (what ingest learns of a message is
        worth keeping in memory for the worker only then)."""
        ...


class InProcessQueue:
    def __init__(self, max_concurrent: int = 256) -> None:
        self._queues: dict[int, deque[int]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._handler: Handler | None = None
        self._accepting = True

    def start(self, handler: Handler) -> None:
        self._handler = handler

    async def put(
        self, conversation_id: int, message_id: int, unlock: HeldLock | None = None
    ) -> None:
        if not self._accepting:
            return  # shutting down: the message is stored and will be recovered at start
        q = self._queues.setdefault(conversation_id, deque())
        if message_id in q:
            return
        q.append(message_id)
        if conversation_id not in self._tasks:
            task = asyncio.create_task(self._run(conversation_id), name=f"conv-{conversation_id}")
            self._tasks[conversation_id] = task

    async def _run(self, conversation_id: int) -> None:
        assert self._handler is not None, "start() the queue before putting work"
        q = self._queues[conversation_id]
        try:
            while q and self._accepting:
                message_id = q[0]
                async with self._slots:
                    try:
                        await self._handler(conversation_id, message_id)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # The handler owns its errors; this only keeps the queue alive.
                        log.exception("worker_failed", conversation_id=conversation_id)
                q.popleft()
        finally:
            self._tasks.pop(conversation_id, None)
            if not q:
                self._queues.pop(conversation_id, None)

    async def drain(self, grace_s: float) -> bool:
        self._accepting = False
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _done, not_done = await asyncio.wait(tasks, timeout=grace_s)
        for t in not_done:
            t.cancel()
        if not_done:
            await asyncio.gather(*not_done, return_exceptions=True)
        return not not_done

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def here(self, conversation_id: int) -> bool:
        return True
