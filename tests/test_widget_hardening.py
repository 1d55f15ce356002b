"""The widget under abuse and faults: a socket whose event pump fails is closed with a code
the widget reconnects on; uploads have quotas and unattached ones are cleaned up; the client
address behind proxies is the right-most hop the proxies did not vouch for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.exc import OperationalError

from bot.settings import Settings
from channels.widget.socket import CLOSE_SERVER_ERROR
from tests.support import RunningService, eventually
from tests.widget_support import (
    SHOP_ORIGIN,
    is_final,
    new_token,
    socket,
    start_widget_service,
)


@pytest.fixture
async def svc(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    s = await start_widget_service(sqlite_url, settings_factory, tmp_path, monkeypatch)
    yield s
    await s.stop()


async def test_failing_event_pump_closes_the_socket_with_1011_and_resume_works(
    svc: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = new_token()
    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.say("hello there")
        ack = await ws.next_of("ack")
        await ws.until(is_final)
    cid = ack["conversation_id"]

    host = svc.services.host
    real = host.list_messages

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT messages", {}, Exception("connection reset"))

    monkeypatch.setattr(host, "list_messages", broken)
    async with socket(svc) as ws:
        await ws.hello(token, conversation_id=cid, after=0)
        msg = await ws.ws.receive(timeout=20)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.ws.close_code == CLOSE_SERVER_ERROR

    # The database is back: the widget's reconnect resumes with the whole conversation.
    monkeypatch.setattr(host, "list_messages", real)
    async with socket(svc) as ws:
        await ws.hello(token, conversation_id=cid, after=0)
        frames = await ws.until(is_final)
    assert [f["type"] for f in frames if f["type"] in ("message", "final")] == [
        "message",
        "final",
    ]


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)


async def upload(svc: RunningService, token: str, body: bytes = PNG) -> Any:
    return await svc.client.post(
        "/widget/v1/uploads?site=shop",
        content=body,
        headers={"Origin": SHOP_ORIGIN, "X-Widget-Token": token, "Content-Type": "image/png"},
    )


def files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "uploads").rglob("*") if p.is_file())


async def test_upload_quotas_per_visitor_and_per_site(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = len(PNG)
    quotas = {"max_bytes": n, "visitor_bytes_per_day": 3 * n, "site_bytes_per_day": 5 * n}
    svc = await start_widget_service(
        sqlite_url, settings_factory, tmp_path, monkeypatch, attachments=quotas
    )
    try:
        alice, bob = new_token(), new_token()
        for _ in range(3):
            assert (await upload(svc, alice)).status_code == 201
        refused = await upload(svc, alice)
        assert refused.status_code == 429 and refused.json()["error"] == "upload_quota"
        assert len(files(tmp_path)) == 3  # the refused one was not written
        # Another visitor has their own quota, until the site's is spent.
        assert (await upload(svc, bob)).status_code == 201
        assert (await upload(svc, bob)).status_code == 201
        refused = await upload(svc, new_token())
        assert refused.status_code == 429 and refused.json()["error"] == "upload_quota"
        assert len(files(tmp_path)) == 5
    finally:
        await svc.stop()


async def test_unattached_uploads_are_deleted_attached_ones_kept(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc = await start_widget_service(
        sqlite_url, settings_factory, tmp_path, monkeypatch, attachments={"orphan_seconds": 1}
    )
    try:
        token = new_token()
        kept = (await upload(svc, token)).json()
        orphan = (await upload(svc, token)).json()
        async with socket(svc) as ws:
            await ws.hello(token)
            await ws.say("", attachments=[kept["id"]])
            await ws.next_of("ack")

        async def swept() -> bool:
            return files(tmp_path) == [kept["id"]]

        assert await eventually(swept)
        assert (await svc.client.get(kept["url"])).status_code == 200
        assert (await svc.client.get(orphan["url"])).status_code == 404
    finally:
        await svc.stop()


async def test_forwarded_for_uses_the_hop_our_proxies_added(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = {
        "ip_messages_per_minute": 2,
        "visitor_messages_per_minute": 100,
        "trust_forwarded_for": True,
        "proxy_hops": 2,
    }
    svc = await start_widget_service(
        sqlite_url, settings_factory, tmp_path, monkeypatch, rate_limits=limits
    )
    try:

        async def post(forwarded: str) -> int:
            body = {"token": new_token(), "client_id": new_token()[:20], "text": "hi"}
            r = await svc.client.post(
                "/widget/v1/messages?site=shop",
                json=body,
                headers={"Origin": SHOP_ORIGIN, "X-Forwarded-For": forwarded},
            )
            return r.status_code

        # The client varies what it writes (the left part); the CDN's hop stays the same.
        codes = [await post(f"10.9.{i}.1, 203.0.113.7, 198.51.100.2") for i in range(3)]
        assert codes == [202, 202, 429]
        # Another client behind the same proxies has its own budget.
        assert await post("198.51.100.99, 192.0.2.4, 198.51.100.2") == 202
    finally:
        await svc.stop()
