"""The web chat widget channel (see channel.py for its routes)."""

from __future__ import annotations

from channels.base import Channel
from channels.widget.config import WidgetSettings


def build(settings: WidgetSettings) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled)."""
    if not settings.enabled:
        return []
    from channels.widget.channel import WidgetChannel

    return [WidgetChannel(settings)]
