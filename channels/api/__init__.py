"""The HTTP API channel (see channel.py for its routes)."""

from __future__ import annotations

import os

import structlog

from channels.api.config import ApiSettings
from channels.base import Channel
from channels.peers import loopback as _loopback

log = structlog.get_logger(__name__)


def build(settings: ApiSettings, *, server_host: str) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled).

    Without the key variable the development key is accepted, but only while the service
    listens on loopback (`server_host`), and then only from a loopback peer with no proxy in
    between (see ApiChannel); elsewhere this raises RuntimeError naming the variable to set."""
    if not settings.enabled:
        return []
    from channels.api.channel import ApiChannel

    key = os.environ.get(settings.api_key_env)
    if key:
        return [ApiChannel(settings.account, [key])]
    if not _loopback(server_host):
        raise RuntimeError(
            f"set {settings.api_key_env} before serving the HTTP API on "
            f"{server_host}: the development key works only on loopback"
        )
    log.warning(
        "api_dev_key",
        detail=f"{settings.api_key_env} is unset; the HTTP API accepts the development key "
        f"'{settings.dev_api_key}' from loopback callers only, never through a proxy",
    )
    return [ApiChannel(settings.account, [], dev_key=settings.dev_api_key)]
