"""The `channels.wechat` section of swarmdesk.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WechatSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
