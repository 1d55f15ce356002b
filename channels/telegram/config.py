"""The `channels.telegram` section of swarmdesk.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TelegramSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
