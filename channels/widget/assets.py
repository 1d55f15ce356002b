"""The widget's static files (script, style sheet, demo shop page), served from memory,
gzipped once at start, with an ETag so browsers revalidate cheaply."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import html
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from channels.http import ApiError

_TYPES = {
    "js": "application/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "html": "text/html; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    content_type: str


def _read(name: str) -> bytes:
    return resources.files("channels.widget").joinpath("static", name).read_bytes()


def make_asset(name: str, body: bytes) -> Asset:
    return Asset(
        body=body,
        gzipped=gzip.compress(body, 9, mtime=0),
        etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"',
        content_type=_TYPES[name.rsplit(".", 1)[1]],
    )


class Assets:
    def __init__(self, demo_site: str | None, demo_visitor: tuple[str, str] | None) -> None:
        self.demo_site = demo_site
        self.demo_visitor = demo_visitor  # (shop user id, its HMAC): the demo page signs in
        self._assets: dict[str, Asset] = {}

    async def load(self) -> None:
        for name in ("widget.js", "widget.css", "demo.html"):
            body = await asyncio.to_thread(_read, name)
            if name == "demo.html" and self.demo_site is not None:
                body = body.replace(b"__SITE_KEY__", self.demo_site.encode())
                user, user_hash = self.demo_visitor or ("", "")
                body = body.replace(b"__USER_ID__", html.escape(user).encode())
                body = body.replace(b"__USER_HASH__", user_hash.encode())
            self._assets[name] = make_asset(name, body)

    def sizes(self) -> dict[str, tuple[int, int]]:
        """name -> (bytes, gzipped bytes)."""
        return {n: (len(a.body), len(a.gzipped)) for n, a in self._assets.items()}

    def handler(self, name: str, cache: str = "public, max-age=300"):  # type: ignore[no-untyped-def]
        async def serve(request: web.Request) -> web.Response:
            asset = self._assets.get(name)
            if asset is None:
                raise ApiError(503, "starting", "the service is starting")
            return respond(request, asset, cache, {"Access-Control-Allow-Origin": "*"})

        return serve


def respond(
    request: web.Request, asset: Asset, cache: str, headers: dict[str, str]
) -> web.Response:
    """`asset` with `headers`: 304 if the browser has it, gzipped if it takes gzip."""
    headers = {
        **headers,
        "ETag": asset.etag,
        "Cache-Control": cache,
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=asset.gzipped, headers=headers)
    return web.Response(body=asset.body, headers=headers)
