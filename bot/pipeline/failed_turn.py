"""A turn that keeps raising: how often it is tried again, and what the shopper gets after
the last try — the fallback text and a person (DESIGN.md: a failure becomes a fallback, then
an escalation), never silence with the typing indicator left on."""

from __future__ import annotations

from functools import partial

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
)
from tenacity import wait_exponential_jitter as backoff

from bot.pipeline.parts import Parts
from channels.base import ConversationEvent, Delivery, message_event
from orchestration.config import ReplySettings
from storage import answers
from storage.answers import Answering
from storage.fences import FenceLost
from storage.models import MessageStatus

log = structlog.get_logger(__name__)

TURN_ATTEMPTS = 3
REASON = "internal_error"


def turn_retries() -> AsyncRetrying:
    """Three tries, 0.5 s then about 1 s apart (with jitter): long enough for a database
    failover or a lock to pass, short enough that the shopper still waits for the answer."""
    return AsyncRetrying(
        stop=stop_after_attempt(TURN_ATTEMPTS),
        wait=backoff(multiplier=0.5, max=4, jitter=0.25),
        # (CancelledError is no Exception: shutdown; FenceLost: another process has the turn)
        retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(FenceLost),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "turn_retry",
            attempt=state.attempt_number,
            error=repr(state.outcome.exception()) if state.outcome else None,
        ),
    )


async def give_up(
    parts: Parts, reply: ReplySettings, conversation_id: int, begun: Answering | None
) -> None:
    """End a turn that failed for good. With its answer reserved: store the fallback text
    as the answer with a handoff, publish it, deliver it. If even that fails (the database
    is down), or nothing was reserved: an `error` event ends what clients show as typing;
    the message stays unanswered in the database and recovery takes it up at the next start."""
    if begun is not None:
        try:
            await _store_fallback(parts, reply, begun)
            return
        except Exception:
            log.exception("turn_fallback_failed", message_id=begun.question.id)
    inflight = parts.hub.inflight(conversation_id)
    seq = begun.seq if begun is not None else inflight[0] if inflight else None
    if seq is not None:
        # Durable at this seq: clients drop the partial text; the hub forgets the answer.
        parts.hub.publish(
            ConversationEvent(
                conversation_id, "error", seq, data={"status": "failed", "reason": REASON}
            )
        )


async def _store_fallback(parts: Parts, reply: ReplySettings, begun: Answering) -> None:
    conv = begun.conversation
    channel = parts.channels.get(conv.channel)
    delivered = channel is not None and channel.capabilities.event_bus_delivery
    text = reply.fallback_text
    row = await parts.db.write(
        partial(
            answers.finish_answer,
            a=answers.FinalAnswer(
                conversation_id=conv.id,
                inbound_id=begun.question.id,
                out_id=begun.out_id,
                out_seq=begun.seq,
                out_created_at=begun.out_created_at,
                text=text,
                calls=[],
                model=None,
                tier=None,
                first_delta_ms=None,
                latency_ms=0.0,
                routing=None,
                delivered=delivered,
                handoff=(REASON, {"detail": "the bot failed to answer; see the service log"}),
            ),
        )
    )
    parts.hub.publish(message_event(row))
    if row.status == MessageStatus.ABANDONED.value:
        return  # a person has it already
    parts.outbox.handed_over(conv.id, REASON)
    if delivered:
        return
    if channel is None:  # the channel is gone from the config: a person follows up
        await parts.db.write(
            partial(
                answers.record_delivery,
                message_id=begun.out_id,
                status=MessageStatus.FAILED.value,
                platform_message_ids=[],
            )
        )
        return

    async def send() -> Delivery:
        return await channel.send(conv, text, sender="bot")

    await parts.outbox.deliver(begun.out_id, conv.id, send)
