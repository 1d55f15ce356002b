"""Handing a finished message to its channel and recording what the platform said; asking
for a person. Shared by the host (system and agent messages), the worker (answers) and
recovery (answers stored before a crash but never confirmed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog

from channels.base import Delivery
from storage import answers, handoff
from storage.executor import Database
from storage.models import MessageStatus

log = structlog.get_logger(__name__)


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def deliver(
        self, out_id: int, conversation_id: int, send: Callable[[], Awaitable[Delivery]]
    ) -> Delivery:
        """Hand the final text to the channel and record what the platform said."""
        try:
            delivery = await send()
        except Exception as e:
            log.exception("delivery_failed", message_id=out_id)
            delivery = Delivery(ok=False, detail=repr(e))
        await self.db.write(
            partial(
                answers.record_delivery,
                message_id=out_id,
                status=delivery_status(delivery),
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
            log.info("handoff_requested", conversation_id=conversation_id, reason=reason)
        return handed


def delivery_status(delivery: Delivery) -> str:
    if delivery.ok:
        return MessageStatus.SENT.value
    if delivery.undeliverable:
        return MessageStatus.UNDELIVERABLE.value
    return MessageStatus.FAILED.value


def handoff_card(detail: str, card: dict[str, Any] | None) -> dict[str, Any] | None:
    return {**(card or {}), "detail": detail} if detail or card else None
