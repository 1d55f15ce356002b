"""The wechat channel."""

from __future__ import annotations

from channels.base import Channel
from channels.wechat.config import WechatSettings


def build(settings: WechatSettings) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled)."""
    if not settings.enabled:
        return []
    raise NotImplementedError("the wechat channel is not built yet")
