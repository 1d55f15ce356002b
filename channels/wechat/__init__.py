"""The WeChat family of channels: Official Accounts (`wechat`), WeCom (`wecom`) and WeChat
Customer Service (`wecom_kf`).

One channel object per platform kind serves all its configured accounts, each at its own
callback path.
"""

from __future__ import annotations

from channels.base import Channel
from channels.wechat.config import WechatSettings
from channels.wechat.kf_config import WecomKfSettings
from channels.wechat.tokens import InProcessTokenStore


def build(settings: WechatSettings) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled).

    Raises RuntimeError naming the environment variable to set when a secret is missing."""
    if not settings.enabled:
        return []
    from channels.wechat.official import OfficialAccountChannel
    from channels.wechat.wecom import WecomChannel

    # One store for both channels in this process; with several processes each channel's
    # share() puts the tokens in Redis instead.
    store = InProcessTokenStore()
    channels: list[Channel] = []
    if settings.official_accounts:
        channels.append(OfficialAccountChannel(settings, store))
    if settings.wecom_apps or settings.wecom_bots:
        channels.append(WecomChannel(settings, store))
    return channels


def build_kf(settings: WecomKfSettings) -> list[Channel]:
    """The WeChat Customer Service channel (`channels.wecom_kf`), if enabled.

    Raises RuntimeError naming the environment variable to set when a secret is missing."""
    if not settings.enabled:
        return []
    from channels.wechat.kf import WecomKfChannel

    return [WecomKfChannel(settings)]
