"""At start, after a crash or restart: drop answers cut mid-stream, deliver answers stored
but never confirmed by their channel, queue what was never answered."""

from __future__ import annotations

from functools import partial

import structlog

from bot.pipeline.parts import Parts
from bot.workqueue import WorkQueue
from channels.base import message_event
from storage import reads, recovery

log = structlog.get_logger(__name__)


async def recover(parts: Parts, queue: WorkQueue) -> dict[str, int]:
    db, hub = parts.db, parts.hub
    found = await db.write(recovery.recover)
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
        await queue.put(conversation_id, message_id)
    counts = {
        "abandoned": len(found.abandoned),
        "redelivered": len(found.undelivered),
        "requeued": len(found.unanswered),
    }
    if any(counts.values()):
        log.info("recovered", **counts)
    return counts
