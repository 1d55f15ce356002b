"""The WeCom channel end to end: a self-built application (encrypted XML, answers through
`message/send`) and an intelligent bot (encrypted JSON, `stream` replies polled by WeCom)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select

from bot.settings import Settings
from simulator.fakes.wechat_api import (
    DOC_AES_KEY,
    DOC_APPID,
    DOC_BODY,
    DOC_CONTENT,
    DOC_FROM,
    DOC_MSG_ID,
    DOC_MSG_SIGNATURE,
    DOC_NONCE,
    DOC_TIMESTAMP,
    DOC_TOKEN,
    DOC_VERIFY_ECHOSTR,
    DOC_VERIFY_NONCE,
    DOC_VERIFY_PLAIN,
    DOC_VERIFY_SIGNATURE,
    DOC_VERIFY_TIMESTAMP,
    FakeWechatApi,
    WecomAppClient,
    WecomBotClient,
)
from storage.models import Conversation, Message
from tests.support import RunningService, eventually, start_service

SECRET = "corp-secret"
BOT_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
WELCOME = "你好，我是小助手，有问题尽管问我。"
HOLDING = "答案还在准备中，稍后发给您。"
LONG = "给我详细讲讲这件羊毛大衣的面料和保养方法 [[sim:tokens=1400]] [[sim:tps=450]]"
SLOW = "这件衣服是什么面料的？ [[sim:tokens=40]] [[sim:tps=10]]"  # about 4 s


@dataclass
class Wc:
    svc: RunningService
    api: FakeWechatApi
    http: httpx.AsyncClient
    app: WecomAppClient
    bot: WecomBotClient
    hurry: WecomBotClient  # stream_ttl 1 s: slow answers outlive their stream

    async def inbound(self, external_id: str) -> Message | None:
        async with self.svc.services.sessions() as s:
            q = select(Message).where(Message.external_id == external_id)
            return (await s.execute(q)).scalar_one_or_none()

    async def settled_answer(self, external_id: str) -> Message:
        async def probe() -> Message | None:
            m = await self.inbound(external_id)
            if m is None:
                return None
            async with self.svc.services.sessions() as s:
                q = select(Message).where(Message.reply_to_id == m.id)
                for a in (await s.execute(q)).scalars():
                    if a.status in ("sent", "failed", "undeliverable"):
                        return a
            return None

        return await eventually(probe, timeout=30)

    async def message_count(self) -> int:
        async with self.svc.services.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)


@pytest.fixture
async def wc(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[Wc]:
    api = FakeWechatApi()
    await api.start()
    api.add_corp_app(DOC_APPID, SECRET)
    monkeypatch.setenv("WC_SECRET", SECRET)
    monkeypatch.setenv("WC_DOC_AES_KEY", DOC_AES_KEY)
    monkeypatch.setenv("WC_BOT_AES_KEY", BOT_AES_KEY)
    bot = {"token": "bot-token", "aes_key_env": "WC_BOT_AES_KEY", "welcome_text": WELCOME}
    section = {
        "enabled": True,
        "wecom_api_base_url": api.base_url,
        "wecom_apps": [
            {
                "name": "staff",
                "path": "/wecom/staff",
                "corp_id": DOC_APPID,  # the documentation's sample corp
                "agent_id": 218,
                "token": DOC_TOKEN,
                "aes_key_env": "WC_DOC_AES_KEY",
                "secret_env": "WC_SECRET",
            }
        ],
        "wecom_bots": [
            {"name": "helpdesk", "path": "/wecom/bot", "passive_budget_seconds": 0.5, **bot},
            {
                "name": "hurry",
                "path": "/wecom/hurry",
                "passive_budget_seconds": 0,
                "stream_ttl_seconds": 1.0,
                **bot,
            },
        ],
    }
    svc = await start_service(settings_factory(sqlite_url, channels={"wechat": section}))
    http = httpx.AsyncClient(base_url=svc.base_url, timeout=30)
    env = Wc(
        svc,
        api,
        http,
        WecomAppClient(http, "/wecom/staff", DOC_TOKEN, DOC_AES_KEY, DOC_APPID, 218),
        WecomBotClient(http, "/wecom/bot", "bot-token", BOT_AES_KEY, api),
        WecomBotClient(http, "/wecom/hurry", "bot-token", BOT_AES_KEY, api),
    )
    yield env
    await http.aclose()
    await svc.stop()
    await api.stop()


def user() -> str:
    return "u_" + secrets.token_hex(5)


# -- self-built application --------------------------------------------------------------------


async def test_app_url_verification_with_the_documented_sample(wc: Wc) -> None:
    params = {
        "msg_signature": DOC_VERIFY_SIGNATURE,
        "timestamp": DOC_VERIFY_TIMESTAMP,
        "nonce": DOC_VERIFY_NONCE,
        "echostr": DOC_VERIFY_ECHOSTR,
    }
    r = await wc.http.get("/wecom/staff", params=params)
    assert r.status_code == 200 and r.text == DOC_VERIFY_PLAIN
    bad = await wc.http.get("/wecom/staff", params={**params, "msg_signature": "0" * 40})
    assert bad.status_code == 403


async def test_app_documented_message_is_answered_through_message_send(wc: Wc) -> None:
    params = {"msg_signature": DOC_MSG_SIGNATURE, "timestamp": DOC_TIMESTAMP, "nonce": DOC_NONCE}
    r = await wc.http.post("/wecom/staff", params=params, content=DOC_BODY.encode())
    assert r.status_code == 200 and r.text == ""  # acknowledged at once, no passive reply
    inbound = await wc.inbound(DOC_MSG_ID)
    assert inbound is not None and inbound.text == DOC_CONTENT and inbound.channel == "wecom"
    answer = await wc.settled_answer(DOC_MSG_ID)
    assert answer.status == "sent"
    assert wc.api.joined(DOC_FROM, "wecom") == answer.text
    assert {s.account for s in wc.api.sent} == {f"{DOC_APPID}:218"}
    # WeCom's retry of the same callback is acknowledged and changes nothing.
    again = await wc.http.post("/wecom/staff", params=params, content=DOC_BODY.encode())
    assert again.status_code == 200
    await asyncio.sleep(0.3)
    assert wc.api.joined(DOC_FROM, "wecom") == answer.text


async def test_app_long_answer_and_agent_messages_respect_the_byte_limit(wc: Wc) -> None:
    member = user()
    r = await wc.app.send_text(member, LONG)
    assert r.status_code == 200
    inbound = await eventually(lambda: _latest_inbound(wc, member))
    answer = await wc.settled_answer(inbound)
    pieces = wc.api.texts(member, "wecom")
    assert len(pieces) >= 2 and all(len(p.encode()) <= 2048 for p in pieces)
    assert "".join(pieces) == answer.text

    conv = answer.conversation_id
    sent = await wc.svc.services.host.send_message(
        conv, "我是人工客服，已为您登记。", sender="agent"
    )
    assert sent.status == "sent"
    assert wc.api.texts(member, "wecom")[-1] == "我是人工客服，已为您登记。"


async def _latest_inbound(wc: Wc, member: str) -> str | None:
    async with wc.svc.services.sessions() as s:
        q = select(Message.external_id).where(Message.direction == "in")
        q = q.join(Conversation, Conversation.id == Message.conversation_id)
        q = q.where(Conversation.chat_id == member).order_by(Message.id.desc())
        return (await s.execute(q)).scalars().first()


async def test_app_refuses_bad_callbacks(wc: Wc) -> None:
    params = {"msg_signature": "0" * 40, "timestamp": DOC_TIMESTAMP, "nonce": DOC_NONCE}
    r = await wc.http.post("/wecom/staff", params=params, content=DOC_BODY.encode())
    assert r.status_code == 403
    xxe = (
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/hostname">]><xml><Encrypt>&e;</Encrypt></xml>'
    )
    r = await wc.http.post("/wecom/staff", params=params, content=xxe.encode())
    assert r.status_code == 400
    r = await wc.http.post("/wecom/staff", params=params, content=b"<xml><Encrypt>")
    assert r.status_code == 400
    assert await wc.message_count() == 0


# -- intelligent bot ---------------------------------------------------------------------------


async def test_bot_streams_the_answer_until_finish(wc: Wc) -> None:
    member = user()
    payload = wc.bot.text_payload(member, SLOW)
    first = wc.bot.decode(await wc.bot.post(payload))
    assert first is not None and first["msgtype"] == "stream"
    assert first["stream"]["finish"] is False  # a 4-second answer: WeCom will poll
    sid = first["stream"]["id"]

    # WeCom's retry of the message gets the same stream, not a second answer.
    again = wc.bot.decode(await wc.bot.post(payload))
    assert again is not None and again["stream"]["id"] == sid

    stream, seen = await wc.bot.poll_until_finished(sid)
    answer = await wc.settled_answer(payload["msgid"])
    assert stream["content"] == answer.text
    assert all(answer.text.startswith(c) for c in seen), "the text only grows"
    assert len({c for c in seen if c}) >= 2, "the shopper watched it being written"
    inbound = await wc.inbound(payload["msgid"])
    assert inbound is not None and inbound.channel == "wecom" and inbound.account == "helpdesk"


async def test_bot_fast_answer_finishes_in_the_first_reply(wc: Wc) -> None:
    payload = wc.bot.text_payload(user(), "在吗？你们公司是哪一年成立的？")
    first = wc.bot.decode(await wc.bot.post(payload))
    assert first is not None
    answer = await wc.settled_answer(payload["msgid"])
    stream = first["stream"]
    if not stream["finish"]:  # a busy machine: the next poll has it
        stream, _ = await wc.bot.poll_until_finished(stream["id"])
    assert stream["content"] == answer.text


async def test_bot_group_message_and_welcome(wc: Wc) -> None:
    member = user()
    hello = {
        "msgid": secrets.token_hex(8),
        "aibotid": "AIBOT",
        "from": {"userid": member},
        "msgtype": "event",
        "event": {"eventtype": "enter_chat"},
    }
    reply = wc.bot.decode(await wc.bot.post(hello))
    assert reply == {"msgtype": "text", "text": {"content": WELCOME}}

    payload = wc.bot.text_payload(member, "@小助手 这款耳机适合跑步吗？", chat="grp-42")
    first = wc.bot.decode(await wc.bot.post(payload))
    assert first is not None
    await wc.bot.poll_until_finished(first["stream"]["id"])
    inbound = await wc.inbound(payload["msgid"])
    assert inbound is not None and inbound.text == "这款耳机适合跑步吗？"
    async with wc.svc.services.sessions() as s:
        conv = await s.get(Conversation, inbound.conversation_id)
    assert conv is not None and conv.chat_id == "grp-42"


async def test_bot_stream_closed_at_expiry_then_the_answer_goes_by_response_url(wc: Wc) -> None:
    payload = wc.hurry.text_payload(user(), SLOW)
    first = wc.hurry.decode(await wc.hurry.post(payload))
    assert first is not None and first["stream"]["finish"] is False
    await asyncio.sleep(1.2)  # past the stream's 1-second life
    stream, _ = await wc.hurry.poll_until_finished(first["stream"]["id"])
    assert stream["content"].endswith(HOLDING)
    answer = await wc.settled_answer(payload["msgid"])
    assert answer.status == "sent"
    url_key = payload["response_url"].rsplit("/", 1)[1]
    assert wc.api.texts(url_key, "response_url") == [answer.text]


async def test_bot_refuses_bad_callbacks(wc: Wc) -> None:
    params = {"msg_signature": "0" * 40, "timestamp": "1", "nonce": "n"}
    r = await wc.http.post("/wecom/bot", params=params, json={"encrypt": "abc"})
    assert r.status_code == 403
    r = await wc.http.post("/wecom/bot", params=params, content=b"{not json")
    assert r.status_code == 400
    assert await wc.message_count() == 0


async def test_bot_stream_stops_when_a_person_claims_the_conversation(wc: Wc) -> None:
    from tests.test_agents_console import Console, _agent

    await _agent(wc.svc, "wang")
    wang = Console(wc.svc, "wang")
    try:
        await wang.sign_in()
        payload = wc.bot.text_payload(
            user(), "这件衣服是什么面料的？ [[sim:tokens=80]] [[sim:tps=10]]"
        )
        first = wc.bot.decode(await wc.bot.post(payload))
        assert first is not None
        sid = first["stream"]["id"]

        async def writing() -> str | None:
            reply = await wc.bot.poll(sid)
            content = reply["stream"]["content"] if reply else ""
            return content or None

        shown = await eventually(writing)
        inbound = await wc.inbound(payload["msgid"])
        assert inbound is not None
        r = await wang.post(f"/conversations/{inbound.conversation_id}/claim")
        assert r.status_code == 200
        stream, _ = await wc.bot.poll_until_finished(sid)
        # The stream closes on what was shown at the claim (give or take a piece).
        assert len(stream["content"]) <= len(shown) + 20

        async def abandoned() -> bool:
            async with wc.svc.services.sessions() as s:
                q = select(Message.status).where(Message.reply_to_id == inbound.id)
                return list((await s.execute(q)).scalars()) == ["abandoned"]

        assert await eventually(abandoned)
    finally:
        await wang.close()
