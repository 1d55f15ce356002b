"""The widget's server side end to end, speaking its protocol the way the browser does:
WebSocket frames in and out, the SSE + POST fallback, uploads, identity, limits, bad input."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from bot.settings import Settings
from channels.widget.config import WidgetSettings
from channels.widget.identity import sign
from storage.models import Contact, Message
from tests.support import RunningService, eventually, sse_events, start_service
from tests.widget_support import (
    SECRET,
    SECRET_ENV,
    SHOP_ORIGIN,
    is_final,
    new_token,
    socket,
    widget,
    widget_config,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)


@pytest.fixture
async def svc(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    s = await start_service(settings_factory(sqlite_url, channels=widget_config(tmp_path)))
    yield s
    await s.stop()


@pytest.fixture
async def svc_any_db(
    db_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningService]:
    """The service on SQLite and on PostgreSQL."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    s = await start_service(settings_factory(db_url, channels=widget_config(tmp_path)))
    yield s
    await s.stop()


async def stored_messages(svc: RunningService, conversation_id: int) -> list[Message]:
    async with svc.services.sessions() as s:
        q = select(Message).where(Message.conversation_id == conversation_id)
        return list((await s.execute(q.order_by(Message.seq))).scalars())


async def answered(svc: RunningService, conversation_id: int, count: int = 1) -> list[Message]:
    async def probe() -> list[Message] | None:
        rows = await stored_messages(svc, conversation_id)
        done = [m for m in rows if m.direction == "out" and m.status == "sent"]
        return rows if len(done) >= count else None

    return await eventually(probe)


async def test_message_streams_answer_over_websocket(svc: RunningService) -> None:
    async with socket(svc) as ws:
        ready = await ws.hello(new_token())
        assert ready["conversation_id"] is None and ready["verified"] is False
        client_id = await ws.say("do you ship to Lyon? [[sim:tokens=20]]")
        frames = await ws.until(is_final)

    kinds = [f["type"] for f in frames]
    assert kinds[0] == "conversation"
    ack = next(f for f in frames if f["type"] == "ack")
    assert ack["client_id"] == client_id and ack["duplicate"] is False
    mine = next(f for f in frames if f["type"] == "message")
    assert mine["sender"] == "contact" and mine["text"].startswith("do you ship to Lyon?")
    assert mine["seq"] == ack["seq"]
    deltas = [f for f in frames if f["type"] == "delta"]
    assert len(deltas) >= 2, "the answer must arrive token by token"
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    final = frames[-1]
    assert "".join(d["text"] for d in deltas) == final["text"]
    assert final["sender"] == "bot" and final["reply_to_id"] == ack["message_id"]
    assert kinds.index("typing") < kinds.index("delta")

    rows = await answered(svc, ack["conversation_id"])
    assert [m.text for m in rows if m.direction == "out"] == [final["text"]]
    assert rows[0].channel == "widget" and rows[0].account == "shop"


async def test_resend_after_reconnect_is_stored_and_answered_once(
    svc_any_db: RunningService,
) -> None:
    svc = svc_any_db
    token = new_token()
    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.say("is the blue kettle back?", client_id="m-1")
        ack = await ws.next_of("ack")
    # The page did not see the ack (the connection dropped): it sends the message again.
    async with socket(svc) as ws:
        await ws.hello(token, conversation_id=ack["conversation_id"], after=0)
        await ws.say("is the blue kettle back?", client_id="m-1")
        again = await ws.next_of("ack")
    assert again["duplicate"] is True
    assert (again["message_id"], again["seq"]) == (ack["message_id"], ack["seq"])
    rows = await answered(svc, ack["conversation_id"])
    await asyncio.sleep(0.3)  # room for a wrong second answer
    rows = await stored_messages(svc, ack["conversation_id"])
    assert [m.direction for m in rows] == ["in", "out"]


async def test_dropped_socket_resumes_mid_answer_without_gap_or_duplicate(
    svc_any_db: RunningService,
) -> None:
    svc = svc_any_db
    token = new_token()
    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.say("tell me about returns [[sim:tps=40]] [[sim:tokens=60]]")
        frames = await ws.until(lambda f: f["type"] == "delta" and f["index"] >= 4)
    conv = next(f for f in frames if f["type"] == "conversation")["conversation_id"]
    seen = [f for f in frames if f["type"] == "delta"]
    durable = {f["seq"] for f in frames if f["type"] in ("message", "final")}
    answer_seq = seen[-1]["seq"]

    async with socket(svc) as ws:
        ready = await ws.hello(
            token,
            conversation_id=conv,
            after=max(durable),
            delta=[answer_seq, seen[-1]["index"]],
        )
        assert ready["conversation_id"] == conv
        rest = await ws.until(is_final)

    later = [f for f in rest if f["type"] == "delta"]
    indexes = [d["index"] for d in seen + later]
    assert indexes == list(range(len(indexes))), "no index missing or repeated"
    final = rest[-1]
    assert "".join(d["text"] for d in seen + later) == final["text"]
    assert not any(f["type"] == "message" and f["seq"] in durable for f in rest)


async def test_fresh_page_gets_history_and_answers_given_while_away(svc: RunningService) -> None:
    token = new_token()
    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.say("when does the sale end?")
        ack = await ws.next_of("ack")
    # The page was closed before the answer came.
    rows = await answered(svc, ack["conversation_id"])
    async with socket(svc) as ws:
        ready = await ws.hello(token, conversation_id=ack["conversation_id"])
        assert ready["from"] == 0
        history = await ws.until(is_final)
    durable = [f for f in history if f["type"] in ("message", "final")]
    assert [(f["seq"], f["text"]) for f in durable] == [(m.seq, m.text) for m in rows]


async def test_another_visitor_cannot_follow_a_conversation(svc: RunningService) -> None:
    async with socket(svc) as ws:
        await ws.hello(new_token())
        await ws.say("my address is secret street 1")
        ack = await ws.next_of("ack")
    async with socket(svc) as ws:
        ready = await ws.hello(new_token(), conversation_id=ack["conversation_id"], after=5)
        assert (ready["conversation_id"], ready["from"]) == (None, 0)
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_unknown_site_and_disallowed_origin_are_refused(svc: RunningService) -> None:
    async with httpx.AsyncClient(base_url=svc.base_url) as c:
        ws_headers = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        r = await c.get(
            "/widget/v1/ws?site=shop", headers={**ws_headers, "Origin": "https://evil.example"}
        )
        assert r.status_code == 403
        assert r.json()["error"] == "origin_not_allowed"
        assert "allowed_origins" in r.json()["detail"]
        r = await c.get("/widget/v1/ws?site=nope", headers={**ws_headers, "Origin": SHOP_ORIGIN})
        assert r.status_code == 404 and r.json()["error"] == "unknown_site"
        assert "data-site" in r.json()["detail"]
        # The page can read why (CORS on errors too).
        r = await c.get("/widget/v1/sites/shop", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert r.headers["Access-Control-Allow-Origin"] == "https://evil.example"
        r = await c.get("/widget/v1/sites/shop", headers={"Origin": SHOP_ORIGIN})
        assert r.status_code == 200 and r.json()["greeting"]["en"]
        # A site whose only allowed origin is swarmdesk itself refuses the shop's origin.
        r = await c.get("/widget/v1/sites/demo", headers={"Origin": SHOP_ORIGIN})
        assert r.status_code == 403
        r = await c.get("/widget/v1/sites/demo", headers={"Origin": svc.base_url})
        assert r.status_code == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        async with socket(svc, origin="http://shop.test.evil.example"):
            pass
    assert e.value.status == 403


async def test_bad_frames_get_problem_frames_and_nothing_valid_is_lost(
    svc: RunningService,
) -> None:
    token = new_token()
    limit = widget(svc).settings.max_frame_bytes
    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.send("{not json")
        assert (await ws.recv())["code"] == "invalid_json"
        await ws.ws.send_bytes(b"\x00\x01")
        assert (await ws.recv())["code"] == "binary_not_supported"
        await ws.send({"type": "dance"})
        assert (await ws.recv())["code"] == "unknown_type"
        await ws.send({"type": "send", "client_id": "x", "text": "a" * (limit + 10)})
        problem = await ws.recv()
        assert problem["code"] == "frame_too_large" and str(limit) in problem["detail"]
        await ws.send({"type": "send", "client_id": "bad id!", "text": "hi"})
        assert (await ws.recv())["code"] == "invalid_field"
        await ws.send({"type": "send", "client_id": "e1", "text": "   "})
        empty = await ws.recv()
        assert empty["code"] == "empty_message" and empty["client_id"] == "e1"
        # The connection still works and the valid message is answered.
        await ws.say("a valid question", client_id="ok-1")
        frames = await ws.until(is_final)
        ack = next(f for f in frames if f["type"] == "ack")
        conv = ack["conversation_id"]

        # Over the hard cap the server closes the socket with a reason...
        await ws.send("x" * (2 * 1024 * 1024))
        msg = await ws.ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.ws.close_code == 1009

    # ...and keeps serving: the page reconnects and finds its conversation intact.
    async with socket(svc) as ws:
        await ws.hello(token, conversation_id=conv)
        history = await ws.until(is_final)
    assert [f["text"] for f in history if f["type"] == "message"] == ["a valid question"]


async def test_first_frame_must_be_a_valid_hello(svc: RunningService) -> None:
    async with socket(svc) as ws:
        await ws.send({"type": "hello", "token": "short"})
        problem = await ws.recv()
        assert problem["code"] == "invalid_token"
        msg = await ws.ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.ws.close_code == 4400
    async with socket(svc) as ws:
        await ws.send({"type": "send", "client_id": "a", "text": "hi"})
        assert (await ws.recv())["code"] == "hello_expected"


async def contact_of(svc: RunningService, conversation_id: int) -> Contact:
    conv = await svc.services.host.get_conversation(conversation_id)
    assert conv is not None
    async with svc.services.sessions() as s:
        contact = await s.get(Contact, conv.contact_id)
        assert contact is not None
        return contact


async def test_verified_shop_user_is_marked_on_the_contact(svc: RunningService) -> None:
    token = new_token()
    user = {"id": "u-42", "hash": sign(SECRET, "u-42"), "name": "Ann"}
    async with socket(svc) as ws:
        ready = await ws.hello(token, user=user)
        assert ready["verified"] is True
        await ws.say("where is my order?")
        ack = await ws.next_of("ack")
    assert ack["verified"] is True
    contact = await contact_of(svc, ack["conversation_id"])
    assert contact.attributes["verified"] is True
    assert contact.attributes["shop_user_id"] == "u-42"
    assert contact.display_name == "Ann"

    # A forged hash is not trusted: the same visitor is anonymous from then on.
    async with socket(svc) as ws:
        ready = await ws.hello(token, user={"id": "u-1", "hash": "00" * 32})
        assert ready["verified"] is False
        assert "does not match" in ready["identity_problem"]
        await ws.say("and my other order?")
        await ws.next_of("ack")
    contact = await contact_of(svc, ack["conversation_id"])
    assert contact.attributes["verified"] is False
    assert contact.attributes["shop_user_id"] is None


async def test_rate_limit_per_visitor_keeps_the_connection(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = widget_config(tmp_path, rate_limits={"visitor_messages_per_minute": 2})
    svc = await start_service(settings_factory(sqlite_url, channels=config))
    try:
        async with socket(svc) as ws:
            await ws.hello(new_token())
            for i in range(2):
                await ws.say(f"question {i}", client_id=f"q{i}")
                await ws.next_of("ack")
            await ws.say("one too many", client_id="q2")
            problem = await ws.next_of("problem")
            assert problem["code"] == "rate_limited" and problem["client_id"] == "q2"
            assert problem["retry_after"] > 0
            await ws.send({"type": "ping"})
            await ws.next_of("pong")
        acks = [f for f in ws.frames if f["type"] == "ack"]
        conv = acks[0]["conversation_id"]
        rows = await stored_messages(svc, conv)
        assert "one too many" not in [m.text for m in rows]
    finally:
        await svc.stop()


async def test_open_connections_per_address_are_capped(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = widget_config(tmp_path, rate_limits={"ip_connections": 2})
    svc = await start_service(settings_factory(sqlite_url, channels=config))
    try:
        async with socket(svc) as a, socket(svc) as b:
            await a.hello(new_token())
            await b.hello(new_token())
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                async with socket(svc):
                    pass
            assert e.value.status == 429
        # Closed ones free their slot.
        async with socket(svc) as c:
            await c.hello(new_token())
    finally:
        await svc.stop()


async def test_image_attachments_are_checked_stored_and_served(svc: RunningService) -> None:
    token = new_token()
    url = "/widget/v1/uploads?site=shop"
    headers = {"Origin": SHOP_ORIGIN, "X-Widget-Token": token, "Content-Type": "image/png"}
    async with httpx.AsyncClient(base_url=svc.base_url) as c:
        r = await c.post(url, content=b"<html>not an image</html>", headers=headers)
        assert r.status_code == 415 and r.json()["error"] == "unsupported_type"
        r = await c.post(url, content=PNG + bytes(250_000), headers=headers)
        assert r.status_code == 413 and "MB" in r.json()["detail"]
        r = await c.post(url, content=PNG, headers={**headers, "X-Widget-Token": "x"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_token"
        r = await c.post(url, content=PNG, headers=headers)
        assert r.status_code == 201, r.text
        upload = r.json()
        assert upload["mime"] == "image/png" and upload["size"] == len(PNG)
        assert r.headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        served = await c.get(upload["url"])
        assert served.status_code == 200 and served.content == PNG
        assert served.headers["Content-Type"] == "image/png"
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        assert (await c.get("/widget/v1/files/../../etc/passwd")).status_code == 404

    async with socket(svc) as ws:
        await ws.hello(token)
        await ws.say("", client_id="img-bad", attachments=["0" * 32 + ".png"])
        problem = await ws.next_of("problem")
        assert problem["code"] == "unknown_attachment"
        await ws.say("", client_id="img-1", attachments=[upload["id"]])
        frames = await ws.until(lambda f: f["type"] == "message")
    mine = frames[-1]
    assert mine["kind"] == "image"
    assert mine["attachments"][0]["url"] == upload["url"]


async def test_agent_and_system_messages_reach_the_page(svc: RunningService) -> None:
    async with socket(svc) as ws:
        await ws.hello(new_token())
        await ws.say("I want to speak to someone")
        frames = await ws.until(is_final)
        conv = next(f for f in frames if f["type"] == "ack")["conversation_id"]
        pipeline = svc.services.host
        await pipeline.send_message(conv, "Hi, I'm Mia from the support team.", sender="agent")
        await pipeline.send_message(conv, "Mia joined the conversation.", sender="system")
        agent = await ws.next_of("message")
        system = await ws.next_of("message")
    assert (agent["sender"], agent["text"]) == ("agent", "Hi, I'm Mia from the support team.")
    assert system["sender"] == "system"
    assert system["seq"] == agent["seq"] + 1


async def test_sse_and_post_fallback(svc: RunningService) -> None:
    token = new_token()
    body = {"token": token, "client_id": "p-1", "text": "hello without websockets"}
    async with httpx.AsyncClient(base_url=svc.base_url, timeout=30) as c:
        headers = {"Origin": SHOP_ORIGIN}
        r = await c.post("/widget/v1/messages?site=shop", json=body, headers=headers)
        assert r.status_code == 202, r.text
        ack = r.json()
        assert r.headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        r = await c.post("/widget/v1/messages?site=shop", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["duplicate"] is True

        params = {"site": "shop", "token": token, "conversation_id": str(ack["conversation_id"])}
        got: list[Any] = []
        async with c.stream("GET", "/widget/v1/events", params=params, headers=headers) as s:
            assert s.status_code == 200
            async for ev in sse_events(s):
                got.append(ev)
                if ev.event == "final":
                    break
        assert got[0].event == "ready" and got[0].data["conversation_id"] == ack["conversation_id"]
        kinds = [e.event for e in got]
        assert "message" in kinds and "final" in kinds
        deltas = [e.data["text"] for e in got if e.event == "delta"]
        if deltas:  # the answer was read live (a fast one may be history already)
            assert "".join(deltas) == got[-1].data["text"]
        assert got[-1].id is not None  # EventSource resumes from it by itself
        # Preflight for the JSON POST from another origin.
        r = await c.options(
            "/widget/v1/messages?site=shop",
            headers={**headers, "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]
        # Someone else's token sees nothing of this conversation.
        r = await c.get(
            "/widget/v1/events", params={**params, "token": new_token()}, headers=headers
        )
        assert '"conversation_id":null' in r.text


async def test_demo_page_embeds_the_widget_with_one_script_tag(svc: RunningService) -> None:
    async with httpx.AsyncClient(base_url=svc.base_url) as c:
        page = await c.get("/")
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        # One tag; the demo signs its visitor in as the demo shopper (who owns demo orders).
        tag = '<script src="/widget/v1/widget.js" data-site="demo" data-user-id="demo-shopper" '
        assert tag in page.text
        total_gz = 0
        for name in ("widget.js", "widget.css"):
            r = await c.get(f"/widget/v1/{name}", headers={"Accept-Encoding": "gzip"})
            assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
            total_gz += len(gzip.compress(r.content))  # httpx decoded it; measure again
            again = await c.get(f"/widget/v1/{name}", headers={"If-None-Match": r.headers["ETag"]})
            assert again.status_code == 304
    assert total_gz <= 30 * 1024, f"widget is {total_gz} bytes gzipped; the budget is 30 KB"


def test_widget_config_mistakes_are_explained() -> None:
    with pytest.raises(ValidationError) as e:
        WidgetSettings.model_validate(
            {"sites": [{"key": "s", "allowed_origins": ["shop.example.com/path"]}]}
        )
    assert "https://shop.example.com" in str(e.value)
    with pytest.raises(ValidationError) as e:
        WidgetSettings.model_validate({"sites": [{"key": "s"}], "demo_site": "s"})
    assert "'self'" in str(e.value)
    with pytest.raises(ValidationError) as e:
        WidgetSettings.model_validate({"sites": [{"key": "a"}, {"key": "a"}]})
    assert "duplicate" in str(e.value)
    with pytest.raises(ValidationError) as e:
        WidgetSettings.model_validate({"sites": [{"key": "a", "colour": "blue"}]})
    assert "#2563eb" in str(e.value)
    ok = WidgetSettings.model_validate(
        {"sites": [{"key": "a", "allowed_origins": ["https://*.shop.example", "http://x:3000/"]}]}
    )
    assert ok.sites[0].allowed_origins == ["https://*.shop.example", "http://x:3000"]
    assert json.loads(WidgetSettings().model_dump_json())["sites"][0]["key"] == "demo"
