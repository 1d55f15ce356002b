"""Who is on the other end: loopback addresses, and requests that came through a proxy."""

from __future__ import annotations

import ipaddress

from aiohttp import web

# Headers a reverse proxy adds; a request carrying one did not come straight from its peer.
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def loopback(host: str | None) -> bool:
    """Whether `host` (an address or "localhost") is this machine only."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def direct_local_caller(request: web.Request) -> bool:
    """The peer is on this machine and no proxy says it forwards someone else: a proxy on the
    same host (nginx) is a loopback peer too, so its headers give it away."""
    if any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    return loopback(request.remote)
