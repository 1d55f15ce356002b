"""Human agents on the agent API (docs/agent-api.md): sign-in, CSRF, tokens, the inbox, and
the ownership rules — a person claims, replies, hands back; the bot never talks over them."""

from __future__ import annotations

import io
import json
from functools import partial
from typing import Any

import httpx
import pytest

from bot.cli import main
from bot.console.auth import hash_password, new_token, secret_hash
from storage import agents
from tests.support import RunningService, eventually

API = "/api/v1/agent"
PASSWORD = "correct horse battery"


async def _agent(svc: RunningService, name: str, role: str = "agent") -> int:
    db = svc.services.pipeline.parts.db
    row = await db.write(
        partial(
            agents.add_agent,
            name=name,
            email=f"{name}@shop.test",
            role=role,
            password_hash=await hash_password(PASSWORD),
        )
    )
    return row.id


class Console:
    """An agent signed in at the console (cookie + CSRF), like the browser."""

    def __init__(self, svc: RunningService, name: str) -> None:
        self.client = httpx.AsyncClient(base_url=svc.base_url, timeout=30)
        self.name = name
        self.csrf = ""

    async def sign_in(self) -> httpx.Response:
        r = await self.client.post(
            f"{API}/session", json={"email": f"{self.name}@shop.test", "password": PASSWORD}
        )
        if r.status_code == 200:
            self.csrf = r.json()["csrf_token"]
        return r

    async def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(
            f"{API}{path}", json=body or {}, headers={"X-CSRF-Token": self.csrf}
        )

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(f"{API}{path}", params=params)

    async def waiting(self) -> list[dict[str, Any]]:
        r = await self.get("/conversations", view="waiting")
        r.raise_for_status()
        return list(r.json()["conversations"])

    async def close(self) -> None:
        await self.client.aclose()


async def _ask_for_a_person(svc: RunningService, contact: str) -> int:
    r = await svc.post(contact_id=contact, text="转人工")
    assert r.status_code == 202
    cid = int(r.json()["conversation_id"])

    async def handed() -> bool:
        conv = await svc.services.host.get_conversation(cid)
        return conv is not None and conv.owner == "handoff_requested"

    await eventually(handed)
    return cid


async def test_agent_claims_replies_and_hands_back(service: RunningService) -> None:
    await _agent(service, "mia")
    await _agent(service, "leo")
    mia, leo = Console(service, "mia"), Console(service, "leo")
    try:
        assert (await mia.sign_in()).status_code == 200
        assert (await leo.sign_in()).status_code == 200
        cid = await _ask_for_a_person(service, "ann")
        waiting = await mia.waiting()
        assert [c["id"] for c in waiting] == [cid]
        assert waiting[0]["handoff"]["reason"]
        assert waiting[0]["waiting_seconds"] is not None

        r = await mia.post(f"/conversations/{cid}/claim")
        assert r.status_code == 200 and r.json()["owner"] == "human"
        # Another agent can neither take it nor answer in it.
        r = await leo.post(f"/conversations/{cid}/claim")
        assert r.status_code == 409 and r.json()["error"] == "owned_by_other"
        r = await leo.post(f"/conversations/{cid}/reply", {"text": "hi"})
        assert r.status_code == 409 and r.json()["error"] == "not_yours"

        r = await mia.post(f"/conversations/{cid}/reply", {"text": "您好，我是客服小美。"})
        assert r.status_code == 200, r.text
        assert r.json()["sender"] == "agent" and r.json()["status"] == "sent"
        r = await mia.post(f"/conversations/{cid}/notes", {"text": "VIP, be nice"})
        assert r.status_code == 200

        # The shopper writes while a person has it: stored and shown, not answered by the bot.
        r = await service.post(contact_id="ann", text="好的，我的订单是 ORD-1001")
        shopper_msg = r.json()["message_id"]

        async def human_marked() -> bool:
            return any(
                m["id"] == shopper_msg and m["status"] == "human"
                for m in await service.messages(cid)
            )

        await eventually(human_marked)
        shopper_view = await service.messages(cid)
        assert [m["text"] for m in shopper_view if m["sender"] == "agent"] == [
            "您好，我是客服小美。"
        ]
        assert not any("VIP" in m["text"] for m in shopper_view)  # notes stay inside
        history = (await mia.get(f"/conversations/{cid}/messages")).json()["messages"]
        assert [m["kind"] for m in history if m["kind"] == "note"] == ["note"]
        bot_after_claim = [m for m in shopper_view if m["sender"] == "bot" and m["seq"] > 3]
        assert bot_after_claim == []

        r = await mia.post(f"/conversations/{cid}/handback")
        assert r.status_code == 200 and r.json()["owner"] == "bot"
        r = await service.post(contact_id="ann", text="还有，耳机可以退吗？")
        assert await eventually(partial(service.answered, cid, r.json()["message_id"]))

        detail = (await mia.get(f"/conversations/{cid}")).json()
        assert [e["reason"] for e in detail["events"]][-2:] == ["claim", "handback"]
    finally:
        await mia.close()
        await leo.close()


async def test_claim_during_a_streamed_answer_stops_the_bot(service: RunningService) -> None:
    await _agent(service, "mia")
    mia = Console(service, "mia")
    try:
        await mia.sign_in()
        r = await service.post(
            contact_id="bo", text="tell me about returns [[sim:tps=5,tokens=60]]"
        )
        cid, mid = r.json()["conversation_id"], r.json()["message_id"]
        hub = service.services.pipeline.hub

        async def streaming() -> bool:
            inflight = hub.inflight(cid)
            return inflight is not None and len(inflight[1]) > 0

        await eventually(streaming)
        assert (await mia.post(f"/conversations/{cid}/claim")).status_code == 200

        async def settled() -> list[dict[str, Any]] | None:
            answers = [m for m in await service.messages(cid) if m["reply_to_id"] == mid]
            return answers if answers and answers[0]["status"] != "streaming" else None

        answers = await eventually(settled)
        assert [a["status"] for a in answers] == ["abandoned"]
    finally:
        await mia.close()


async def test_sign_in_rules(sqlite_service: RunningService) -> None:
    svc = sqlite_service
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        # No agent, no access.
        assert (await mia.get("/conversations")).status_code == 401
        r = await mia.client.post(
            f"{API}/session", json={"email": "mia@shop.test", "password": "wrong one!!"}
        )
        assert r.status_code == 401 and r.json()["error"] == "wrong_credentials"
        assert "swarmdesk_session" not in r.cookies
        for _ in range(4):
            await mia.client.post(
                f"{API}/session", json={"email": "mia@shop.test", "password": "wrong one!!"}
            )
        r = await mia.sign_in()  # even the right password waits now
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    finally:
        await mia.close()


async def test_session_csrf_token_and_bad_input(sqlite_service: RunningService) -> None:
    svc = sqlite_service
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        r = await mia.sign_in()
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        cid = await _ask_for_a_person(svc, "cy")
        # A change without the CSRF token (a forged cross-site form) does nothing.
        r = await mia.client.post(f"{API}/conversations/{cid}/claim", json={})
        assert r.status_code == 403 and r.json()["error"] == "csrf"
        assert (await mia.waiting())[0]["id"] == cid
        r = await mia.post(f"/conversations/{cid}/claim")
        assert r.status_code == 200
        r = await mia.post(f"/conversations/{cid}/reply", {"text": "x" * 4001})
        assert r.status_code == 413
        r = await mia.post(f"/conversations/{cid}/reply", {"text": "   "})
        assert r.status_code == 400
        r = await mia.post("/conversations/999999/claim")
        assert r.status_code == 404
        r = await mia.post(f"/conversations/{cid}/resolve")
        assert r.json()["owner"] == "resolved"
        r = await mia.post(f"/conversations/{cid}/reply", {"text": "hello?"})
        assert r.status_code == 409 and r.json()["error"] == "resolved"
        sent = [m for m in await svc.messages(cid) if m["sender"] == "agent"]
        assert sent == []  # nothing refused was stored or sent
        # Signed out: the session no longer works.
        await mia.client.delete(f"{API}/session", headers={"X-CSRF-Token": mia.csrf})
        assert (await mia.get("/conversations")).status_code == 401
        # A personal API token works without a cookie or CSRF, until the agent is disabled.
        token = new_token()
        db = svc.services.pipeline.parts.db
        agent = (await db.read(partial(agents.agent_for_sign_in, email="mia@shop.test")))[0]  # type: ignore[index]
        await db.write(
            partial(
                agents.add_credential,
                agent_id=agent.id,
                kind="token",
                secret_hash=secret_hash(token),
            )
        )
        bearer = {"Authorization": f"Bearer {token}"}
        r = await svc.client.get(
            f"{API}/conversations", params={"view": "resolved"}, headers=bearer
        )
        assert r.status_code == 200 and [c["id"] for c in r.json()["conversations"]] == [cid]
        await db.write(partial(agents.set_active, email="mia@shop.test", active=False))
        r = await svc.client.get(f"{API}/conversations", headers=bearer)
        assert r.status_code == 401
    finally:
        await mia.close()


def test_agents_command(sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("SWARMDESK_DATABASE__URL", sqlite_url)
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert (
        main(
            [
                "agents",
                "add",
                "Mia",
                "--email",
                "Mia@Shop.test",
                "--role",
                "admin",
                "--password-stdin",
            ]
        )
        == 0
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("another password\n"))
    assert main(["agents", "add", "Mia 2", "--email", "mia@shop.test", "--password-stdin"]) == 2
    assert "exists already" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    with pytest.raises(SystemExit):
        main(["agents", "add", "Leo", "--email", "leo@shop.test", "--password-stdin"])
    assert main(["agents", "list"]) == 0
    out = capsys.readouterr().out
    assert "mia@shop.test" in out and "admin" in out and "leo@" not in out
    assert main(["agents", "disable", "mia@shop.test"]) == 0
    assert "(disabled)" in (main(["agents", "list"]), capsys.readouterr().out)[1]
    assert main(["agents", "token", "nobody@shop.test"]) == 2


async def test_asking_for_a_person_is_answered_with_the_handoff_text(
    sqlite_service: RunningService,
) -> None:
    svc = sqlite_service
    cid = await _ask_for_a_person(svc, "dee")
    bot = [m for m in await svc.messages(cid) if m["sender"] == "bot"]
    assert [m["text"] for m in bot] == ["人工客服稍后会加入对话。"]
    r = await svc.post(contact_id="eli", text="I want to talk to a human")
    cid = r.json()["conversation_id"]
    answer = await eventually(partial(svc.answered, cid, r.json()["message_id"]))
    assert answer["text"] == "A colleague will join this conversation shortly."


async def test_outside_business_hours_the_shopper_hears_when_people_are_back(
    sqlite_url: str, settings_factory: Any
) -> None:
    from tests.support import start_service

    closed = {"business_hours": {"timezone": "Europe/Berlin", "days": []}}
    svc = await start_service(settings_factory(sqlite_url, reply=closed))
    try:
        cid = await _ask_for_a_person(svc, "fay")
        bot = [m for m in await svc.messages(cid) if m["sender"] == "bot"]
        assert [m["text"] for m in bot] == ["人工客服目前不在线，上班后会第一时间在这里回复您。"]
    finally:
        await svc.stop()


async def test_resolve_asks_for_a_rating_and_the_next_message_reopens_it(
    sqlite_url: str, settings_factory: Any
) -> None:
    from tests.support import start_service

    svc = await start_service(
        settings_factory(sqlite_url, console={"satisfaction_channels": ["api"]})
    )
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        await mia.sign_in()
        cid = await _ask_for_a_person(svc, "gus")
        await mia.post(f"/conversations/{cid}/claim")
        r = await mia.post(f"/conversations/{cid}/resolve")
        assert r.json()["owner"] == "resolved"
        system = [m["text"] for m in await svc.messages(cid) if m["sender"] == "system"]
        assert system == ["本次会话已结束。请问您对我们的服务满意吗？回复 1（很差）到 5（很好）。"]

        r = await svc.post(contact_id="gus", text="5分")
        assert r.json()["conversation_id"] == cid
        detail = (await mia.get(f"/conversations/{cid}")).json()
        assert detail["owner"] == "resolved" and detail["rating"] == 5
        assert [m["status"] for m in await svc.messages(cid)][-1] == "skipped"

        # Anything else opens the same conversation again, for the bot.
        r = await svc.post(contact_id="gus", text="Where is my order ORD-1001?")
        assert r.json()["conversation_id"] == cid
        assert await eventually(partial(svc.answered, cid, r.json()["message_id"]))
        detail = (await mia.get(f"/conversations/{cid}")).json()
        assert detail["owner"] == "bot"
        assert detail["events"][-1]["reason"] == "shopper_wrote"
    finally:
        await mia.close()
        await svc.stop()


async def test_webhooks_are_signed_retried_and_logged(
    sqlite_url: str, settings_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import hmac

    from aiohttp import web

    from tests.support import start_service

    received: list[tuple[str, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((request.headers["X-Swarmdesk-Signature"], await request.read()))
        return web.Response(status=503 if len(received) == 1 else 204)  # the first fails

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    monkeypatch.setenv("SHOP_HOOK_SECRET", "s3cret")
    console = {
        "webhooks": [{"url": url, "secret_env": "SHOP_HOOK_SECRET", "retry_initial_seconds": 0.05}]
    }
    svc = await start_service(settings_factory(sqlite_url, console=console))
    try:
        cid = await _ask_for_a_person(svc, "hal")

        async def delivered() -> bool:
            return len(received) >= 2

        await eventually(delivered)
        signature, body = received[1]
        t, v1 = (part.split("=", 1)[1] for part in signature.split(","))
        expected = hmac.new(b"s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(v1, expected)
        event = json.loads(body)
        assert event["event"] == "handoff.requested"
        assert event["conversation"]["id"] == cid and event["reason"]
        assert received[0][1] == body  # the retry sends the same event

        admin_id = await _agent(svc, "boss", role="admin")
        assert admin_id
        boss = Console(svc, "boss")
        await boss.sign_in()
        log = (await boss.get("/webhooks/deliveries")).json()["deliveries"]
        assert [(d["attempt"], d["status_code"]) for d in reversed(log)] == [(1, 503), (2, 204)]
        await boss.close()
    finally:
        await svc.stop()
        await runner.cleanup()


async def test_suggestion_canned_replies_and_the_report(sqlite_service: RunningService) -> None:
    svc = sqlite_service
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        await mia.sign_in()
        r = await svc.post(contact_id="ivy", text="我的订单 ORD-1001 到哪了？我要投诉，转人工")
        cid = r.json()["conversation_id"]

        async def waiting() -> bool:
            return any(c["id"] == cid for c in await mia.waiting())

        await eventually(waiting)
        await mia.post(f"/conversations/{cid}/claim")
        r = await mia.post(f"/conversations/{cid}/suggest")
        assert r.status_code == 200 and r.json()["text"]
        suggestion = r.json()["text"]
        # A draft for the person only: the shopper never sees it.
        assert suggestion not in [m["text"] for m in await svc.messages(cid)][-1:]
        r = await mia.get("/canned", q="ord", language="zh", conversation_id=cid)
        assert [c["text"] for c in r.json()["canned"]] == ["已为您查询订单 ORD-1001："]
        await mia.post(f"/conversations/{cid}/reply", {"text": "您好，我来看看。"})
        days = (await mia.get("/report", days=1)).json()["days"]
        today = next(d for d in days if d["channel"] == "api")
        assert today["conversations"] == 1 and today["bot_alone"] == 0
        assert sum(today["handoffs"].values()) == 1
        assert today["first_reply_p50_s"] is not None
        text = (await svc.client.get("/metrics")).text
        # (The metrics are the process's: other tests' replies count too.)
        counts = [
            ln
            for ln in text.splitlines()
            if ln.startswith("swarmdesk_first_human_reply_seconds_count")
        ]
        assert counts and float(counts[0].split()[-1]) >= 1
        assert 'swarmdesk_owner_changes_total{action="claim"}' in text
    finally:
        await mia.close()


async def test_a_person_typing_shows_on_the_shoppers_stream(sqlite_service: RunningService) -> None:
    from tests.support import sse_events

    svc = sqlite_service
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        await mia.sign_in()
        cid = await _ask_for_a_person(svc, "jo")
        r = await mia.post(f"/conversations/{cid}/typing")
        assert r.status_code == 409  # not theirs yet: nothing shown
        await mia.post(f"/conversations/{cid}/claim")
        async with svc.client.stream(
            "GET", f"/api/v1/conversations/{cid}/stream", headers=svc.headers
        ) as stream:
            assert (await mia.post(f"/conversations/{cid}/typing")).status_code == 200
            async for ev in sse_events(stream):
                if ev.event == "typing":
                    assert ev.data["by"] == "agent"
                    break
    finally:
        await mia.close()


async def test_the_cheap_tier_writes_the_handoff_cards_summary(
    sqlite_service: RunningService,
) -> None:
    svc = sqlite_service
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        await mia.sign_in()
        cid = await _ask_for_a_person(svc, "kim")

        async def summarised() -> dict[str, Any] | None:
            card = (await mia.get(f"/conversations/{cid}")).json()["handoff"]["card"]
            return card if card.get("summary_by") == "model" else None

        card = await eventually(summarised)
        assert card["summary"] and card["summary_template"].startswith("Handed over:")
        from sqlalchemy import select

        from storage.models import LLMCall

        async with svc.services.sessions() as s:
            purposes = (await s.execute(select(LLMCall.purpose))).scalars().all()
        assert "summary" in purposes  # its cost is in the ledger
    finally:
        await mia.close()
