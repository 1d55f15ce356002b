"""At start, after a crash or restart: drop answers cut mid-stream, deliver answers stored
but never confirmed by their channel, queue what was never answered. With several processes
(queue.backend: redis) the same for the partitions a process takes over, when it takes them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import structlog

from bot.pipeline.parts import Parts
from channels.base import message_event
from storage import reads, recovery
from storage.recovery import Partitions

log = structlog.get_logger(__name__)


async def recover(
    parts: Parts,
    requeue: Callable[[int, int], Awaitable[None]],
    scope: Partitions | None = None,
) -> dict[str, int]:
    """`scope`: only these partitions' conversations (None: all, the one process at start)."""
    db, hub = parts.db, parts.hub
    found = await db.write(partial(recovery.recover, scope=scope))
    for m in found.abandoned:
        hub.publish(message_event(m))
    for m in found.undelivered:
        conv = await db.read(partial(reads.get_conversation, conversation_id=m.conversation_id))
        if conv is None:
            continue
        channel = parts.channels.get(conv.channel)
        if channel is None:
            continue
        await parts.outbox.deliver(
            m.id, m.conversation_id, partial(channel.send, conv, m.text, sender="bot")
        )
    for conversation_id, message_id in found.unanswered:
        await requeue(conversation_id, message_id)
    counts = {
        "abandoned": len(found.abandoned),
        "redelivered": len(found.undelivered),
        "requeued": len(found.unanswered),
    }
    if any(counts.values()):
        log.info("recovered", partitions=scope.held if scope else None, **counts)
    return counts
