"""After a handoff, the cheap tier writes the card's summary for the person who takes over;
in the background: the shopper's answer never waits for it."""

from __future__ import annotations

import asyncio
from functools import partial

import structlog

from bot.hub import Hub, owner_event
from orchestration.events import CallRecord, Turn
from orchestration.summary import Summarise
from storage import handoff, inbox
from storage.executor import Database
from storage.handoff import WAITING
from storage.models import Direction

log = structlog.get_logger(__name__)
_HISTORY = 20


class HandoffSummaries:
    def __init__(self, db: Database, hub: Hub, summarise: Summarise | None) -> None:
        self.db = db
        self.hub = hub
        self.summarise = summarise
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, conversation_id: int) -> None:
        if self.summarise is None:
            return
        task = asyncio.create_task(self._write(conversation_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, conversation_id: int) -> None:
        assert self.summarise is not None
        try:
            found = await self.db.read(
                partial(inbox.draft_context, conversation_id=conversation_id, limit=_HISTORY)
            )
            if found is None:
                return
            turns = [
                Turn("user" if m.direction == Direction.IN.value else "assistant", m.text, m.sender)
                for m in found[3]
            ]
            summary, records = await self.summarise(turns)
            calls = [call_fields(r) for r in records]
            if summary is None and not calls:
                return
            written = await self.db.write(
                partial(
                    handoff.set_summary,
                    conversation_id=conversation_id,
                    summary=summary,
                    calls=calls,
                )
            )
            if written and summary is not None:
                self.hub.announce(owner_event(conversation_id, WAITING, "summary"))
        except Exception:
            log.exception("handoff_summary_failed", conversation_id=conversation_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def call_fields(c: CallRecord) -> dict[str, object]:
    """A ledger row (llm_calls) of a model call, without its conversation and message."""
    return {
        "provider": c.provider,
        "model": c.model,
        "tier": c.tier,
        "specialist": c.specialist,
        "purpose": c.purpose,
        "intent": c.intent,
        "first_token_ms": c.first_token_ms,
        "latency_ms": c.latency_ms,
        "input_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "usage_estimated": c.usage_estimated,
        "cost": c.cost,
        "outcome": c.outcome,
        "error": c.error,
    }
