"""The HTTP API's development key (issue 16, High): it opens the API only to a caller on
this machine talking to swarmdesk directly, never through a proxy, and never when swarmdesk
listens beyond loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from bot.settings import Settings
from channels.api import build
from channels.api.config import ApiSettings
from channels.peers import direct_local_caller, loopback
from tests.support import RunningService, start_service

DEV = {"X-Api-Key": "dev-key"}


@pytest.fixture
async def dev_svc(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    monkeypatch.delenv("SWARMDESK_API_KEY", raising=False)
    svc = await start_service(settings_factory(sqlite_url))
    yield svc
    await svc.stop()


async def post(svc: RunningService, headers: dict[str, str], contact: str) -> int:
    r = await svc.client.post(
        "/api/v1/messages", json={"contact_id": contact, "text": "hi"}, headers=headers
    )
    return r.status_code


async def test_the_dev_key_is_refused_through_a_proxy(dev_svc: RunningService) -> None:
    for i, header in enumerate(
        [
            {"X-Forwarded-For": "203.0.113.9"},
            {"Forwarded": "for=203.0.113.9"},
            {"X-Real-IP": "203.0.113.9"},
            {"X-Forwarded-For": "127.0.0.1"},  # claiming loopback changes nothing
        ]
    ):
        r = await dev_svc.client.post(
            "/api/v1/messages",
            json={"contact_id": f"proxied-{i}", "text": "hi"},
            headers={**DEV, **header},
        )
        assert r.status_code == 403 and r.json()["error"] == "dev_key_not_allowed"
    r = await dev_svc.client.get("/api/v1/conversations/1/messages", headers=DEV | header)
    assert r.status_code == 403
    # Nothing was stored: the first direct message opens conversation 1.
    r = await dev_svc.client.post(
        "/api/v1/messages", json={"contact_id": "local", "text": "hi"}, headers=DEV
    )
    assert r.status_code == 202 and r.json()["conversation_id"] == 1


async def test_a_real_key_works_behind_a_proxy(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> None:
    svc = await start_service(settings_factory(sqlite_url))
    try:
        headers = {**svc.headers, "X-Forwarded-For": "203.0.113.9"}
        assert await post(svc, headers, "behind-nginx") == 202
        assert await post(svc, {**DEV, "X-Forwarded-For": "203.0.113.9"}, "x") == 401
        assert await post(svc, DEV, "x") == 401  # a real key set: no dev key at all
    finally:
        await svc.stop()


def test_the_dev_key_is_decided_by_the_peer_address() -> None:
    def request(peer: str, **headers: str) -> bool:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (
            (peer, 40000) if key == "peername" else default
        )
        return direct_local_caller(
            make_mocked_request("GET", "/", headers=headers, transport=transport)
        )

    assert request("127.0.0.1") and request("::1")
    assert not request("10.0.0.7")
    assert not request("127.0.0.1", **{"X-Forwarded-For": "10.0.0.7"})


def test_no_dev_key_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARMDESK_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "10.0.0.7", "shop.example.com"):
        assert not loopback(host)
        with pytest.raises(RuntimeError, match="SWARMDESK_API_KEY"):
            build(ApiSettings(), server_host=host)
    assert build(ApiSettings(), server_host="127.0.0.1")
