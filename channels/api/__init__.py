"""The HTTP API channel (see channel.py for its routes)."""

from __future__ import annotations

import ipaddress
import os

import structlog

from channels.api.config import ApiSettings
from channels.base import Channel

log = structlog.get_logger(__name__)


def build(settings: ApiSettings, *, server_host: str) -> list[Channel]:
    """The channel objects this config section asks for (none while disabled).

    Without the key variable the development key is accepted, but only while the service
    listens on loopback (`server_host`); elsewhere this raises RuntimeError naming the
    variable to set."""
    if not settings.enabled:
        return []
    from channels.api.channel import ApiChannel

    key = os.environ.get(settings.api_key_env)
    if not key:
        if not _loopback(server_host):
            raise RuntimeError(
                f"set {settings.api_key_env} before serving the HTTP API on "
                f"{server_host}: the development key works only on loopback"
            )
        key = settings.dev_api_key
        log.warning(
            "api_dev_key",
            detail=f"{settings.api_key_env} is unset; the HTTP API "
            f"accepts the development key '{key}' on loopback only",
        )
    return [ApiChannel(settings.account, [key])]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
