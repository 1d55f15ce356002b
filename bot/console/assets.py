"""The agent console's front end: index.html at /console and its script and style sheet at
/console/static/, read once at start, gzipped, with an ETag. The page is plain JS (no build
step) under a strict Content-Security-Policy: scripts and styles only from this origin, no
inline code, no framing — an injected message text can never run in an agent's browser."""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web

from channels.http import ApiError
from channels.widget.assets import Asset, make_asset, respond

STATIC = ("console.js", "console.css")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The page names its files with their content hash (?v=...), so a changed file is a new
# URL: the files may then be cached for a year, the page itself never.
IMMUTABLE = "public, max-age=31536000, immutable"
ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("console_assets", dict)


def _read(name: str) -> bytes:
    return resources.files("bot.console").joinpath("static", name).read_bytes()


def _version(asset: Asset) -> str:
    return asset.etag.strip('"')[:12]


def load_assets() -> dict[str, Asset]:
    assets = {name: make_asset(name, _read(name)) for name in STATIC}
    page = _read("index.html")
    for name, asset in assets.items():
        page = page.replace(
            f"static/{name}".encode(), f"static/{name}?v={_version(asset)}".encode()
        )
    assets["index.html"] = make_asset("index.html", page)
    return assets


def _asset(request: web.Request, name: str) -> Asset:
    asset = request.app[ASSETS].get(name)
    if asset is None:
        raise ApiError(503, "starting", "the service is starting")
    return asset


async def page(request: web.Request) -> web.Response:
    return respond(request, _asset(request, "index.html"), "no-store", _SECURITY)


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise ApiError(404, "not_found", f"no console file {name!r}")
    asset = _asset(request, name)
    versioned = request.query.get("v") == _version(asset)
    return respond(request, asset, IMMUTABLE if versioned else "no-cache", _SECURITY)


async def _load(app: web.Application) -> None:
    app[ASSETS].update(await asyncio.to_thread(load_assets))


def register_console_assets(app: web.Application) -> None:
    """GET /console (the page) and /console/static/{name}; the files load at start-up."""
    app[ASSETS] = {}
    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/static/{name}", static_file)
    app.on_startup.append(_load)
