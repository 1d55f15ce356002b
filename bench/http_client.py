"""The load generator's HTTP client and a GET that may fail."""

from __future__ import annotations

import contextlib

import aiohttp


def http_client(sock_read_s: float | None = None) -> aiohttp.ClientSession:
    """A client without a connection limit (the load opens many at once).

    With `sock_read_s`: no total timeout (streams last as long as the run), only this one
    per read; without it, aiohttp's defaults.
    """
    connector = aiohttp.TCPConnector(limit=0)
    if sock_read_s is None:
        return aiohttp.ClientSession(connector=connector)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=sock_read_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def fetch_text(http: aiohttp.ClientSession, url: str) -> str | None:
    """The body of a GET, or None when it failed (metrics are nice to have, not essential)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with http.get(url) as r:
            return await r.text()
    return None
