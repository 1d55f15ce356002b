"""What the host, the worker and recovery share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bot.hub import Hub
from bot.pipeline.outbox import Outbox
from bot.pipeline.prepared import PreparedTurns
from bot.pipeline.summaries import HandoffSummaries
from channels.base import Channel
from orchestration.summary import Summarise
from storage.executor import Database


@dataclass(frozen=True, slots=True)
class Parts:
    db: Database
    hub: Hub
    channels: Mapping[str, Channel]
    outbox: Outbox
    prepared: PreparedTurns
    summaries: HandoffSummaries
    # Conversations a person has taken over since this process started: the bot stops
    # sending to them at once, whatever it was doing (DESIGN.md, Conversation ownership).
    taken: set[int] = field(default_factory=set)

    @classmethod
    def of(
        cls,
        db: Database,
        hub: Hub,
        channels: Mapping[str, Channel],
        summarise: Summarise | None = None,
    ) -> Parts:
        summaries = HandoffSummaries(db, hub, summarise)
        outbox = Outbox(db, channels, hub, summaries)
        return cls(db, hub, channels, outbox, PreparedTurns(), summaries)
