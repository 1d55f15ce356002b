"""The telegram channel: bots on webhooks (or long polling), streamed replies, groups, media."""

from __future__ import annotations

from channels.base import Channel
from channels.telegram.config import TelegramSettings


def build(settings: TelegramSettings) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled).

    One channel serves every configured bot; raises TelegramConfigError when a bot's token
    or webhook secret is missing from the environment.
    """
    if not settings.enabled:
        return []
    from channels.telegram.channel import TelegramChannel  # aiogram loads only when used

    return [TelegramChannel(settings)]
