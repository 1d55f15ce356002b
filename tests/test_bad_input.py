"""Input no client of ours sends (nesting, NUL, lone surrogates, integers past 64 bits, odd
cursors) gets a JSON 4xx that says why, stores nothing, and leaves the service answering."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.settings import Settings
from storage.models import Message
from tests.support import RunningService, eventually
from tests.widget_support import SHOP_ORIGIN, new_token, socket, start_widget_service

BAD_BODIES = {
    "deep_nesting": '{"contact_id": "a", "text": "hi", "x": ' + "[" * 20_000 + "]" * 20_000 + "}",
    "lone_surrogate": '{"contact_id": "a", "text": "hi \\ud800 there"}',
    "nul": '{"contact_id": "a\\u0000", "text": "hi"}',
    "huge_conversation_id": '{"contact_id": "a", "text": "hi", "conversation_id": 2'
    + "0" * 19
    + "}",
    "huge_contact_int": '{"contact_id": 99999999999999999999999, "text": "hi"}',
}


@pytest.fixture
async def svc(
    db_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    s = await start_widget_service(db_url, settings_factory, tmp_path, monkeypatch)
    yield s
    await s.stop()


async def stored(svc: RunningService) -> int:
    async with svc.services.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(Message))).scalar_one())


async def opened(
    svc: RunningService, path: str, params: dict[str, str], headers: dict[str, str]
) -> tuple[int, bytes]:
    """A GET's status and body; an event stream that opened is not read (it never ends)."""
    async with svc.client.stream("GET", path, params=params, headers=headers) as r:
        streaming = "content-length" not in r.headers
        if streaming and r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, b"(an event stream)"
        return r.status_code, await r.aread()


def assert_json_4xx(status: int, body: bytes) -> None:
    assert 400 <= status < 500, (status, body[:200])
    assert "error" in json.loads(body)


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
async def test_bad_api_body_is_a_json_400_and_stores_nothing(
    svc: RunningService, kind: str
) -> None:
    r = await svc.client.post(
        "/api/v1/messages",
        content=BAD_BODIES[kind].encode(),
        headers={**svc.headers, "Content-Type": "application/json"},
    )
    assert_json_4xx(r.status_code, r.content)
    assert await stored(svc) == 0
    ok = await svc.post(contact_id="a", text="still there?")
    assert ok.status_code == 202


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
async def test_bad_widget_post_is_a_json_400_and_stores_nothing(
    svc: RunningService, kind: str
) -> None:
    body = BAD_BODIES[kind].replace('"contact_id": "a"', f'"token": "{new_token()}"')
    r = await svc.client.post(
        "/widget/v1/messages?site=shop",
        content=body.replace('"text"', '"client_id": "c1", "text"').encode(),
        headers={"Origin": SHOP_ORIGIN, "Content-Type": "application/json"},
    )
    assert_json_4xx(r.status_code, r.content)
    assert await stored(svc) == 0


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "-5"},
        {"after": "9223372036854775808"},
        {"before": "99999999999999999999999999"},
        {"after": "²"},
        {"after": "-3"},
        {"before": "1e3"},
    ],
)
async def test_bad_history_query_is_a_json_400(svc: RunningService, params: dict[str, str]) -> None:
    r = await svc.post(contact_id="q", text="hello")
    cid = r.json()["conversation_id"]
    got = await svc.client.get(
        f"/api/v1/conversations/{cid}/messages", params=params, headers=svc.headers
    )
    assert got.status_code == 400, got.text
    assert got.json()["error"] == "invalid_parameter"


@pytest.mark.parametrize("cid", ["9223372036854775808", "99999999999999999999999", "²", "-1"])
async def test_conversation_ids_past_64_bits_are_not_found(svc: RunningService, cid: str) -> None:
    for tail in ("messages", "stream"):
        path = f"/api/v1/conversations/{cid}/{tail}"
        status, body = await opened(svc, path, {}, svc.headers)
        assert status == 404, body
        assert json.loads(body)["error"] == "not_found"


@pytest.mark.parametrize(
    "cursor",
    [
        {"Last-Event-ID": "99999999999999999999"},
        {"Last-Event-ID": "3-x.1"},
        {"Last-Event-ID": "garbage"},
        {"Last-Event-ID": "1-2"},
        {"after": "9223372036854775808"},
        {"after": "x"},
    ],
)
async def test_bad_stream_cursor_is_a_json_400(svc: RunningService, cursor: dict[str, str]) -> None:
    r = await svc.post(contact_id="s", text="hello")
    cid = r.json()["conversation_id"]
    headers = dict(svc.headers)
    params = {}
    if "after" in cursor:
        params["after"] = cursor["after"]
    else:
        headers.update(cursor)
    status, body = await opened(svc, f"/api/v1/conversations/{cid}/stream", params, headers)
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_parameter"


async def test_widget_sse_with_bad_ids_and_cursors(svc: RunningService) -> None:
    token = new_token()
    headers = {"Origin": SHOP_ORIGIN}
    r = await svc.client.post(
        "/widget/v1/messages?site=shop",
        json={"token": token, "client_id": "c1", "text": "hello"},
        headers=headers,
    )
    cid = str(r.json()["conversation_id"])
    # Not a conversation id: nothing to follow yet (a "ready" without a conversation).
    for bad_id in ("99999999999999999999999", "²", "-1"):
        params = {"site": "shop", "token": token, "conversation_id": bad_id}
        status, body = await opened(svc, "/widget/v1/events", params, headers)
        assert status == 200 and b'"conversation_id":null' in body, body
    # The visitor's conversation with a cursor that cannot be: a JSON 400.
    for cursor in ({"after": "99999999999999999999999"}, {"last_event_id": "x-1"}):
        params = {"site": "shop", "token": token, "conversation_id": cid, **cursor}
        status, body = await opened(svc, "/widget/v1/events", params, headers)
        assert status == 400, body
        assert json.loads(body)["error"] == "invalid_parameter"


async def test_bad_widget_frames_get_a_problem_and_the_socket_lives(
    svc: RunningService,
) -> None:
    async with socket(svc) as ws:
        await ws.hello(new_token())
        for frame in (
            '{"type": "send", "client_id": "a", "text": ' + "[" * 3000 + "]" * 3000 + "}",
            '{"type": "send", "client_id": "b", "text": "x \\udc00"}',
            '{"type": "send", "client_id": "c", "text": "hi", "n": 1' + "0" * 30 + "}",
        ):
            await ws.send(frame)
            problem = await ws.next_of("problem")
            assert problem["code"] == "invalid_json"
        cid = await ws.say("a real question")
        ack = await ws.next_of("ack")
        assert ack["client_id"] == cid
    assert await eventually(lambda: stored(svc)) >= 1
