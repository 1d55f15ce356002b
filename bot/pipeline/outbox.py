"""Handing a finished message to its channel and recording what the platform said; asking
for a person. Shared by the host (system and agent messages), the worker (answers) and
recovery (answers stored before a crash but never confirmed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import structlog

from bot import metrics
from bot.hub import Hub, owner_event
from bot.pipeline.summaries import HandoffSummaries
from bot.workqueue import WORK_LEASE, Lease
from channels.base import Channel, ConversationRef, Delivery, may_send
from storage import answers, handoff, reads
from storage.executor import Database
from storage.handoff import WAITING
from storage.models import MessageStatus

log = structlog.get_logger(__name__)

# How long a delivery waits for a late renewal of its work partition's lease (longer than a
# renewal ever runs late but for a lost lease).
RENEWAL_WAIT_S = 10.0
_POLL_S = 0.05


class Outbox:
    def __init__(
        self,
        db: Database,
        channels: Mapping[str, Channel] | None = None,
        hub: Hub | None = None,
        summaries: HandoffSummaries | None = None,
    ) -> None:
        self.db = db
        self.channels: Mapping[str, Channel] = channels or {}
        self.hub = hub
        self.summaries = summaries

    async def deliver(
        self, out_id: int, conversation_id: int, send: Callable[[], Awaitable[Delivery]]
    ) -> Delivery:
        """Hand the final text to the channel and record what the platform said."""
        delivery = await _send(out_id, send)
        if not delivery.ok and not may_send():
            lease = WORK_LEASE.get()
            if lease is not None and not lease.valid():
                # Not a person: this process could not renew the conversation's work
                # partition in time. Renewed: send now; lost: the answer stays pending and
                # the partition's next holder sends it when it takes the partition over.
                if not await _renewed(lease):
                    log.warning("delivery_left_to_next_holder", message_id=out_id)
                    return delivery
                delivery = await _send(out_id, send)
        status = delivery_status(delivery)
        if not delivery.ok and not may_send():
            status = MessageStatus.ABANDONED.value  # a person took over while it waited
        await self.db.write(
            partial(
                answers.record_delivery,
                message_id=out_id,
                status=status,
                platform_message_ids=delivery.platform_message_ids,
            )
        )
        if delivery.undeliverable:
            # The platform will not take it (e.g. WeChat's 48-hour window): a person follows up.
            await self.request_handoff(conversation_id, "undeliverable", delivery.detail)
        return delivery

    async def request_handoff(
        self,
        conversation_id: int,
        reason: str,
        detail: str = "",
        card: dict[str, Any] | None = None,
    ) -> bool:
        handed = await self.db.write(
            partial(
                handoff.request_handoff,
                conversation_id=conversation_id,
                reason=reason,
                card=handoff_card(detail, card),
            )
        )
        if handed:
            self.handed_over(conversation_id, reason)
            conv = await self.db.read(
                partial(reads.get_conversation, conversation_id=conversation_id)
            )
            channel = self.channels.get(conv.channel) if conv is not None else None
            if conv is not None and channel is not None:
                await handed_off(channel, conv, reason)
        return handed

    def handed_over(self, conversation_id: int, reason: str) -> None:
        """A handoff was stored (here, or with the answer that says so): count it, tell the
        console and the webhooks, have the card's summary written."""
        log.info("handoff_requested", conversation_id=conversation_id, reason=reason)
        metrics.HANDOFFS.labels(reason).inc()
        if self.hub is not None:
            self.hub.announce(owner_event(conversation_id, WAITING, "handoff", reason))
        if self.summaries is not None:
            self.summaries.request(conversation_id)


async def handed_off(channel: Channel, conv: ConversationRef, reason: str) -> None:
    """Tell the channel (a platform with its own reception moves the chat there)."""
    try:
        await channel.handed_off(conv, reason)
    except Exception:
        log.exception("channel_handoff_failed", conversation_id=conv.id, channel=conv.channel)


async def _send(out_id: int, send: Callable[[], Awaitable[Delivery]]) -> Delivery:
    try:
        return await send()
    except Exception as e:
        log.exception("delivery_failed", message_id=out_id)
        return Delivery(ok=False, detail=repr(e))


async def _renewed(lease: Lease, wait_s: float = RENEWAL_WAIT_S) -> bool:
    """Whether a lease that is late in renewing is renewed (not lost) within `wait_s`."""
    # (Polled: a renewal sets no event; it is rare and short.)
    for _ in range(max(1, round(wait_s / _POLL_S))):
        if not lease.held() or lease.valid():
            break
        await asyncio.sleep(_POLL_S)
    return lease.valid()


def delivery_status(delivery: Delivery) -> str:
    if delivery.ok:
        return MessageStatus.SENT.value
    if delivery.undeliverable:
        return MessageStatus.UNDELIVERABLE.value
    return MessageStatus.FAILED.value


def handoff_card(detail: str, card: dict[str, Any] | None) -> dict[str, Any] | None:
    return {**(card or {}), "detail": detail} if detail or card else None
