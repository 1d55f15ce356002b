"""Ingest -> conversation worker -> orchestration -> delivery (DESIGN.md, Data flow), split
the way Rasa splits its Agent / MessageProcessor / LockStore:

- host.py: what the channels call (`ChannelHost`): every inbound message is stored before
  the webhook is acknowledged, then queued;
- worker.py: answers one queued message through the channel it came from, stores the answer;
- recovery.py: at start, answers whatever a crash left unanswered;
- outbox.py: delivery to a channel and handoff requests, which all three share;
- prepared.py: what ingest hands the worker in memory so it needn't read it back;
- parts.py: what the three share (database, event bus, channels, outbox).

The work queue (bot.workqueue) and the chat locks (bot.locks) are interfaces with in-memory
implementations; `Pipeline` wires one of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from bot.distributed.queue import RedisQueue
from bot.hub import Hub
from bot.locks import KeyedLocks, LockStore
from bot.pipeline.host import Host
from bot.pipeline.parts import Parts
from bot.pipeline.recovery import recover
from bot.pipeline.worker import TurnWorker
from bot.workqueue import WorkQueue
from channels.base import Channel
from orchestration.config import ReplySettings
from orchestration.orchestrator import Orchestrator
from orchestration.summary import Summarise
from storage.executor import Database


@dataclass(slots=True)
class Pipeline:
    parts: Parts
    host: Host
    worker: TurnWorker
    queue: WorkQueue

    @classmethod
    def build(
        cls,
        db: Database,
        hub: Hub,
        queue: WorkQueue,
        orchestrator: Orchestrator,
        channels: Mapping[str, Channel],
        reply: ReplySettings,
        chat_locks: LockStore | None = None,
        summarise: Summarise | None = None,
    ) -> Pipeline:
        parts = Parts.of(db, hub, channels, summarise)
        locks = chat_locks if chat_locks is not None else KeyedLocks()
        host = Host(parts, queue, locks, reply.history_messages)
        return cls(parts, host, TurnWorker(parts, orchestrator, reply), queue)

    @property
    def hub(self) -> Hub:
        return self.parts.hub

    def start(self) -> None:
        self.queue.start(self.worker.handle)

    async def recover(self) -> dict[str, int]:
        """After a crash or restart: drop cut answers, deliver stored ones, answer the rest.
        With several processes each does so for the partitions it takes, as it takes them
        (others are working the rest right now)."""
        if isinstance(self.queue, RedisQueue):
            await self.queue.on_takeover(partial(recover, self.parts))
            return {}
        return await recover(self.parts, self.queue.put)

    async def close(self) -> None:
        """After the work queue drained: close the database threads."""
        await self.parts.summaries.close()
        await self.parts.db.close()
