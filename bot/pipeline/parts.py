"""What the host, the worker and recovery share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bot.hub import Hub
from bot.pipeline.outbox import Outbox
from bot.pipeline.prepared import PreparedTurns
from channels.base import Channel
from storage.executor import Database


@dataclass(frozen=True, slots=True)
class Parts:
    db: Database
    hub: Hub
    channels: Mapping[str, Channel]
    outbox: Outbox
    prepared: PreparedTurns
    # Channels whose callers the shop itself authenticates, server to server
    # (`Capabilities.verified_callers`): their contacts are verified shoppers.
    trusted_channels: frozenset[str]

    @classmethod
    def of(cls, db: Database, hub: Hub, channels: Mapping[str, Channel]) -> Parts:
        trusted = frozenset(n for n, ch in channels.items() if ch.capabilities.verified_callers)
        return cls(db, hub, channels, Outbox(db), PreparedTurns(), trusted)
