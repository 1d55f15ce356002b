"""Helpers of the widget tests: settings, a WebSocket client speaking the widget protocol, a
small "shop" web server on its own origin, and headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket as socketlib
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
from aiohttp import web

from bot.app import SERVICES, build_app
from bot.settings import Settings
from channels.widget.channel import WidgetChannel
from channels.widget.config import WidgetSettings
from tests.support import RunningService, start_service

SECRET_ENV = "TEST_WIDGET_SECRET"
SECRET = "shop-identity-secret"
SHOP_ORIGIN = "http://shop.test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
# A test run leaves the checkout as it was: screenshots go to a temp dir unless asked for
# (SWARMDESK_SCREENSHOTS=docs/screenshots refreshes the README's).
SCREENSHOTS = Path(
    os.environ.get("SWARMDESK_SCREENSHOTS") or Path(tempfile.gettempdir()) / "swarmdesk-screenshots"
)


def widget_config(tmp_path: Path, *origins: str, **extra: Any) -> dict[str, Any]:
    """`channels.widget` with a site 'shop' for `origins` (and swarmdesk's own pages)."""
    config: dict[str, Any] = {
        "sites": [
            {
                "key": "shop",
                "name": "Test shop",
                "allowed_origins": [SHOP_ORIGIN, *origins, "self"],
                "identity_secret_env": SECRET_ENV,
            },
            WidgetSettings().sites[0].model_dump(),  # the built-in demo shop's site
        ],
        "attachments": {"dir": str(tmp_path / "uploads"), "max_bytes": 200_000},
    }
    config.update(extra)
    return {"widget": config}


def widget(svc: RunningService) -> WidgetChannel:
    ch = svc.services.channels["widget"]
    assert isinstance(ch, WidgetChannel)
    return ch


def new_token() -> str:
    return secrets.token_urlsafe(24)


class WidgetSocket:
    """A browser's side of the widget protocol, frame by frame."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession):
        self.ws = ws
        self.session = session
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def hello(self, token: str, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "hello", "token": token, **fields})
        return await self.next_of("ready")

    async def say(self, text: str, client_id: str | None = None, **fields: Any) -> str:
        client_id = client_id or secrets.token_hex(8)
        await self.send({"type": "send", "client_id": client_id, "text": text, **fields})
        return client_id

    async def recv(self, timeout: float = 20) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {msg.type.name} {msg.data!r} {msg.extra!r}")
        frame: dict[str, Any] = json.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def next_of(self, *types: str, timeout: float = 20) -> dict[str, Any]:
        while True:
            frame = await self.recv(timeout)
            if frame["type"] in types:
                return frame

    async def until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first for which `done` is true."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                got.append(frame)
                if done(frame):
                    return got

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


def socket(
    svc: RunningService, site: str = "shop", origin: str | None = SHOP_ORIGIN
) -> contextlib.AbstractAsyncContextManager[WidgetSocket]:
    return socket_at(svc.base_url, site, origin)


@contextlib.asynccontextmanager
async def socket_at(
    base_url: str, site: str = "shop", origin: str | None = SHOP_ORIGIN
) -> AsyncIterator[WidgetSocket]:
    """A widget socket on the service at `base_url` (also another process's)."""
    session = aiohttp.ClientSession()
    headers = {"Origin": origin} if origin else {}
    try:
        ws = await session.ws_connect(
            f"{base_url}/widget/v1/ws?site={site}", headers=headers, max_msg_size=0
        )
    except BaseException:
        await session.close()
        raise
    sock = WidgetSocket(ws, session)
    try:
        yield sock
    finally:
        await sock.close()


def is_final(frame: dict[str, Any]) -> bool:
    return frame["type"] == "final"


# -- a service on a fixed port (so a test can stop and start it again) ---------------------------


def free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def start_on(settings: Settings, port: int) -> RunningService:
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    base = f"http://127.0.0.1:{port}"
    app[SERVICES].listening_on(base)
    return RunningService(base, app, runner, httpx.AsyncClient(base_url=base, timeout=30))


# -- the shop's own web server (another origin than swarmdesk's) --------------------------------

SHOP_PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><title>Test shop</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>body {{ font-family: serif; color: red; }} button {{ all: unset; }}</style></head>
<body><h1>Test shop</h1><p>A page that embeds the widget.</p>
<script src="{service}/widget/v1/widget.js" data-site="{site}" {attrs} async></script>
</body></html>"""


class ShopServer:
    """Serves /page?site=...&lang=...&attrs=... on 127.0.0.1:<port> (its own origin)."""

    def __init__(self) -> None:
        self.service_url = ""
        self.runner: web.AppRunner | None = None
        self.origin = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/page", self._page)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.origin = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _page(self, request: web.Request) -> web.Response:
        q = request.query
        html = SHOP_PAGE.format(
            lang=q.get("lang", "en"),
            service=self.service_url,
            site=q.get("site", "shop"),
            attrs=q.get("attrs", ""),
        )
        return web.Response(text=html, content_type="text/html")

    def url(self, **params: str) -> str:
        return f"{self.origin}/page" + (f"?{urlencode(params)}" if params else "")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def start_widget_service(
    db_url: str,
    factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: Any,
    **widget: Any,
) -> RunningService:
    """The service with `widget_config`'s sites (the identity secret set); `widget` adds to
    or replaces keys of the widget section (`attachments` is merged)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = widget_config(tmp_path)
    attachments = widget.pop("attachments", {})
    config["widget"]["attachments"].update(attachments)
    config["widget"].update(widget)
    return await start_service(factory(db_url, channels=config))
