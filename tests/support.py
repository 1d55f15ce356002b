"""Helpers the tests share: a service on a free port, an SSE reader, polling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from aiohttp import web

from bot.app import SERVICES, Services, build_app
from bot.settings import Settings

API_KEY = "test-key"
T = TypeVar("T")


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream body into events (comments and retry lines skipped)."""
    ev_id: str | None = None
    ev_type = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(ev_id, ev_type, json.loads("\n".join(data)))
            ev_id, ev_type, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            ev_id = value
        elif name == "event":
            ev_type = value
        elif name == "data":
            data.append(value)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 20, every: float = 0.05
) -> T:
    """Poll until `probe` returns something truthy (a wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        await asyncio.sleep(every)


@dataclass
class RunningService:
    base_url: str
    app: web.Application
    runner: web.AppRunner
    client: httpx.AsyncClient
    headers: dict[str, str] = field(default_factory=lambda: {"X-Api-Key": API_KEY})

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def post(self, **body: Any) -> httpx.Response:
        return await self.client.post("/api/v1/messages", json=body, headers=self.headers)

    async def messages(self, conversation_id: int, **params: Any) -> list[dict[str, Any]]:
        r = await self.client.get(
            f"/api/v1/conversations/{conversation_id}/messages",
            params={"limit": 200, **params},
            headers=self.headers,
        )
        r.raise_for_status()
        return list(r.json()["messages"])

    async def answered(self, conversation_id: int, inbound_id: int) -> dict[str, Any] | None:
        """The complete bot answer to `inbound_id`, once stored and delivered."""
        for m in await self.messages(conversation_id):
            if m["reply_to_id"] == inbound_id and m["status"] == "sent":
                return m
        return None

    async def stop(self) -> None:
        await self.client.aclose()
        await self.runner.cleanup()


async def start_service(settings: Settings) -> RunningService:
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    app[SERVICES].listening_on(base)
    client = httpx.AsyncClient(base_url=base, timeout=30)
    return RunningService(base, app, runner, client)
