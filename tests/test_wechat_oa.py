"""The WeChat Official Account channel end to end: callbacks posted as WeChat posts them, the
answer read back from the passive reply or from the fake WeChat API's deliveries."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bot.settings import Settings
from channels.wechat.official import OfficialAccountChannel
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
    FakeWechatApi,
    OfficialAccountClient,
    message_xml,
    sha1_sign,
    text_xml,
)
from storage.models import Conversation, Message
from tests.support import RunningService, eventually, start_service

SECRET = "app-secret"
WELCOME = "欢迎关注！有什么可以帮您？"
SENTENCE_ENDS = ("。", "！", "？", ".", "!", "?", "…", "\n", " ")
# Questions the model answers (not the FAQ or a canned clarification), steered by directives:
# a long Chinese answer (several 2,048-byte pieces) that takes a few seconds...
LONG = "给我详细讲讲这件羊毛大衣的面料和保养方法 [[sim:tokens=1400]] [[sim:tps=450]]"
SLOW = "这件衣服是什么面料的？ [[sim:tokens=40]] [[sim:tps=10]]"  # ...and one of about 4 s


@dataclass
class Wx:
    svc: RunningService
    api: FakeWechatApi
    shop: OfficialAccountClient  # plaintext, 4 s passive budget
    busy: OfficialAccountClient  # plaintext, 1 s passive budget: slow answers go by API
    safe: OfficialAccountClient  # safe mode, with the documentation's sample key
    compat: OfficialAccountClient  # compatible mode: plaintext and encrypted both accepted

    async def inbound(self, external_id: str) -> Message | None:
        async with self.svc.services.sessions() as s:
            q = select(Message).where(Message.external_id == external_id)
            return (await s.execute(q)).scalar_one_or_none()

    async def answers(self, external_id: str) -> list[Message]:
        m = await self.inbound(external_id)
        if m is None:
            return []
        async with self.svc.services.sessions() as s:
            q = select(Message).where(Message.reply_to_id == m.id).order_by(Message.seq)
            return list((await s.execute(q)).scalars())

    async def settled_answer(self, external_id: str) -> Message:
        """The bot's answer once its delivery is recorded (sent, failed or undeliverable)."""

        async def probe() -> Message | None:
            for a in await self.answers(external_id):
                if a.status in ("sent", "failed", "undeliverable"):
                    return a
            return None

        return await eventually(probe, timeout=30)

    async def conversation(self, external_id: str) -> Conversation:
        m = await self.inbound(external_id)
        assert m is not None
        async with self.svc.services.sessions() as s:
            conv = await s.get(Conversation, m.conversation_id)
            assert conv is not None
            return conv

    async def message_count(self) -> int:
        async with self.svc.services.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)


def wechat_section(api_url: str) -> dict[str, Any]:
    common = {"secret_env": "WX_TEST_SECRET", "welcome_text": WELCOME}
    return {
        "enabled": True,
        "api_base_url": api_url,
        "official_accounts": [
            {
                "name": "shop",
                "path": "/wechat/shop",
                "appid": "wx_shop",
                "token": "shop-token",
                "menu": {"ORDER": "我的订单到哪了？"},
                **common,
            },
            {
                "name": "busy",
                "path": "/wechat/busy",
                "appid": "wx_busy",
                "token": "busy-token",
                "passive_budget_seconds": 1.0,
                **common,
            },
            {
                "name": "compat",
                "path": "/wechat/compat",
                "appid": "wx_compat",
                "token": "compat-token",
                "aes_key_env": "WX_DOC_AES_KEY",
                "encryption": "compatible",
                **common,
            },
            {
                "name": "doc",
                "path": "/wechat/doc",
                "appid": DOC_APPID,
                "token_env": "WX_DOC_TOKEN",
                "aes_key_env": "WX_DOC_AES_KEY",
                "encryption": "safe",
                **common,
            },
        ],
    }


async def open_wx(
    monkeypatch: pytest.MonkeyPatch,
    factory: Callable[..., Settings],
    db: str,
) -> tuple[Wx, httpx.AsyncClient]:
    api = FakeWechatApi()
    await api.start()
    for appid in ("wx_shop", "wx_busy", "wx_compat", DOC_APPID):
        api.add_official_account(appid, SECRET)
    monkeypatch.setenv("WX_TEST_SECRET", SECRET)
    monkeypatch.setenv("WX_DOC_TOKEN", DOC_TOKEN)
    monkeypatch.setenv("WX_DOC_AES_KEY", DOC_AES_KEY)
    svc = await start_service(factory(db, channels={"wechat": wechat_section(api.base_url)}))
    http = httpx.AsyncClient(base_url=svc.base_url, timeout=30)
    wx = Wx(
        svc,
        api,
        OfficialAccountClient(http, "/wechat/shop", "shop-token", appid="wx_shop", api=api),
        OfficialAccountClient(http, "/wechat/busy", "busy-token", appid="wx_busy", api=api),
        OfficialAccountClient(
            http, "/wechat/doc", DOC_TOKEN, appid=DOC_APPID, aes_key=DOC_AES_KEY, api=api
        ),
        OfficialAccountClient(
            http, "/wechat/compat", "compat-token", appid="wx_compat", aes_key=DOC_AES_KEY, api=api
        ),
    )
    return wx, http


@pytest.fixture
async def wx(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[Wx]:
    env, http = await open_wx(monkeypatch, settings_factory, sqlite_url)
    yield env
    await http.aclose()
    await env.svc.stop()
    await env.api.stop()


def openid() -> str:
    return "o_" + secrets.token_hex(6)


# -- verification ------------------------------------------------------------------------------


async def test_url_verification_echoes_echostr_only_with_the_right_signature(wx: Wx) -> None:
    r = await wx.shop.verify("8723467891234")
    assert r.status_code == 200 and r.text == "8723467891234"
    bad = await wx.shop.verify("8723467891234", signature="0" * 40)
    assert bad.status_code == 403
    assert bad.json()["error"] == "invalid_signature"
    # Account A's Token does not open account B's path.
    other = OfficialAccountClient(wx.shop.http, "/wechat/busy", "shop-token")
    assert (await other.verify("x")).status_code == 403


# -- the 5-second window -----------------------------------------------------------------------


async def test_fast_answer_is_the_passive_reply(
    monkeypatch: pytest.MonkeyPatch, db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    wx, http = await open_wx(monkeypatch, settings_factory, db_url)
    try:
        user, msg_id = openid(), wx.shop.msg_id()
        r = await wx.shop.send_text(user, "在吗？我想问一下发货时间", msg_id)
        assert r.status_code == 200
        reply = wx.shop.reply(r)
        assert reply is not None, "a fast answer must come back in the callback's response"
        assert reply["MsgType"] == "text" and reply["ToUserName"] == user
        answer = await wx.settled_answer(msg_id)
        assert answer.status == "sent"
        assert reply["Content"] == answer.text and answer.text
        assert wx.api.sent == [] and wx.api.typing == []  # no API call for a passive answer
        inbound = await wx.inbound(msg_id)
        assert inbound is not None and inbound.text == "在吗？我想问一下发货时间"
    finally:
        await http.aclose()
        await wx.svc.stop()
        await wx.api.stop()


async def test_safe_mode_with_the_documented_sample_message(wx: Wx) -> None:
    wx.api.user_wrote(DOC_FROM)
    # The sample was signed years ago: the replay window must see the service's clock then.
    channel = wx.svc.services.channels["wechat"]
    assert isinstance(channel, OfficialAccountChannel)
    channel.replay.clock = lambda: float(DOC_TIMESTAMP)
    params = {
        "signature": sha1_sign(DOC_TOKEN, DOC_TIMESTAMP, DOC_NONCE),
        "timestamp": DOC_TIMESTAMP,
        "nonce": DOC_NONCE,
        "openid": DOC_FROM,
        "encrypt_type": "aes",
        "msg_signature": DOC_MSG_SIGNATURE,
    }
    r = await wx.safe.http.post("/wechat/doc", params=params, content=DOC_BODY.encode())
    assert r.status_code == 200
    inbound = await wx.inbound(DOC_MSG_ID)
    assert inbound is not None and inbound.text == DOC_CONTENT
    answer = await wx.settled_answer(DOC_MSG_ID)
    reply = wx.safe.reply(r)  # decrypted with the sample key; its MsgSignature checked
    assert reply is not None and reply["Content"] == answer.text
    assert reply["ToUserName"] == DOC_FROM
    channel.replay.clock = time.time

    # A message the client encrypts itself is answered the same way...
    user, msg_id = openid(), wx.safe.msg_id()
    r = await wx.safe.send_text(user, "退货要多久？", msg_id, encrypt=True)
    assert wx.safe.reply_text(r) == (await wx.settled_answer(msg_id)).text
    # ...a plaintext message is refused in safe mode, and so is a wrong msg_signature.
    plain = await wx.safe.post_xml(text_xml(user, "hi", wx.safe.msg_id()))
    assert plain.status_code == 403
    forged = await wx.safe.post_xml(
        text_xml(user, "hi", wx.safe.msg_id()), encrypt=True, params={"msg_signature": "0" * 40}
    )
    assert forged.status_code == 403


async def test_compatible_mode_accepts_plaintext_and_encrypted_messages(wx: Wx) -> None:
    user = openid()
    plain_id, enc_id = wx.compat.msg_id(), wx.compat.msg_id()
    plain = await wx.compat.send_text(user, "这双跑鞋偏大还是偏小？", plain_id)
    assert "<Encrypt>" not in plain.text  # answered the way it was asked
    assert wx.compat.reply_text(plain) == (await wx.settled_answer(plain_id)).text
    enc = await wx.compat.send_text(user, "这个保温杯能装热牛奶吗？", enc_id, encrypt=True)
    assert "<Encrypt>" in enc.text
    assert wx.compat.reply_text(enc) == (await wx.settled_answer(enc_id)).text


async def test_slow_answer_says_success_then_arrives_through_the_api_in_pieces(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    r = await wx.busy.send_text(user, LONG, msg_id)
    assert r.status_code == 200 and r.text == "success"
    answer = await wx.settled_answer(msg_id)
    assert answer.status == "sent"
    pieces = wx.api.texts(user, "custom")
    assert len(pieces) >= 2, "a long answer takes several messages"
    assert all(len(p.encode("utf-8")) <= 2048 for p in pieces)
    assert "".join(pieces) == answer.text  # all of it, once, in order
    assert all(p.endswith(SENTENCE_ENDS) for p in pieces[:-1]), "pieces end on a sentence"
    assert (user, "Typing") in wx.api.typing
    assert len(answer.platform_message_ids) == len(pieces)


async def test_three_tries_of_a_slow_message_get_exactly_one_answer(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    xml = text_xml(user, SLOW, msg_id)
    wx.api.user_wrote(user)
    replies = []
    for _ in range(3):  # WeChat's first try and its two retries, same MsgId
        r = await wx.busy.post_xml(xml)
        assert r.status_code == 200
        replies.append(wx.busy.reply_text(r))
    answer = await wx.settled_answer(msg_id)
    got = [t for t in replies if t] + wx.api.texts(user)
    assert "".join(got) == answer.text, "the shopper gets the answer, all of it, once"
    assert len(await wx.answers(msg_id)) == 1
    assert all(t is None for t in replies), "a 4-second answer misses every 1-second window"


async def test_a_retry_while_the_answer_is_written_carries_it_passively(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    xml = text_xml(user, "这款耳机适合跑步吗？ [[sim:tokens=30]] [[sim:tps=20]]", msg_id)  # ~1.5 s
    wx.api.user_wrote(user)
    replies = []
    for _ in range(3):
        r = await wx.busy.post_xml(xml)
        replies.append(wx.busy.reply_text(r))
        if replies[-1]:
            break
    answer = await wx.settled_answer(msg_id)
    assert replies[0] is None  # the first window closed before the answer was ready
    assert replies[-1] == answer.text, "a later try of the same message carried the answer"
    assert wx.api.sent == []


async def test_retry_after_the_answer_went_through_the_api_gets_success(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    xml = text_xml(user, "你们公司是哪一年成立的？ [[sim:tokens=30]] [[sim:tps=20]]", msg_id)
    wx.api.user_wrote(user)
    assert (await wx.busy.post_xml(xml)).text == "success"
    answer = await wx.settled_answer(msg_id)
    late = await wx.busy.post_xml(xml)
    assert late.status_code == 200 and late.text == "success"
    assert wx.api.joined(user) == answer.text


# -- bad input ---------------------------------------------------------------------------------

XXE = (
    '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    "<xml><ToUserName>gh</ToUserName><FromUserName>o_evil</FromUserName>"
    "<CreateTime>1</CreateTime><MsgType>text</MsgType><Content>&xxe;</Content>"
    "<MsgId>1</MsgId></xml>"
)
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    "<xml><FromUserName>o_evil</FromUserName><MsgType>text</MsgType>"
    "<Content>&lol3;</Content><MsgId>2</MsgId></xml>"
)


async def test_bad_callbacks_are_refused_and_nothing_is_stored(wx: Wx) -> None:
    user = openid()
    forged = await wx.shop.post_xml(
        text_xml(user, "hi", wx.shop.msg_id()), params={"signature": "f" * 40}
    )
    assert forged.status_code == 403
    unsigned = await wx.shop.http.post("/wechat/shop", content=b"<xml/>")
    assert unsigned.status_code == 403
    for body in ("<xml><MsgType>text", "not xml at all", XXE, LAUGHS, "<xml></xml>"):
        r = await wx.shop.post_xml(body)
        assert r.status_code == 400, body
        assert r.json()["error"] in ("invalid_xml", "invalid_message")
    huge = text_xml(user, "x" * 40_000, wx.shop.msg_id())
    r = await wx.shop.post_xml(huge)
    assert r.status_code == 400 and r.json()["error"] == "body_too_large"
    assert await wx.message_count() == 0

    # The service keeps serving.
    msg_id = wx.shop.msg_id()
    ok = await wx.shop.send_text(user, "还在吗？", msg_id)
    assert wx.shop.reply_text(ok) == (await wx.settled_answer(msg_id)).text


async def test_unknown_message_types_are_acknowledged_and_recorded(wx: Wx) -> None:
    user, msg_id = openid(), wx.shop.msg_id()
    r = await wx.shop.post_xml(message_xml(user, {"MsgType": "hologram", "MsgId": msg_id}))
    assert r.status_code == 200 and r.text == "success"
    stored = await wx.inbound(msg_id)
    assert stored is not None and stored.kind == "hologram" and stored.status == "skipped"
    assert await wx.answers(msg_id) == []


# -- events and other kinds --------------------------------------------------------------------


async def test_subscribe_gets_the_welcome_text_once(wx: Wx) -> None:
    user = openid()
    xml = message_xml(user, {"MsgType": "event", "Event": "subscribe", "EventKey": ""})
    r = await wx.shop.post_xml(xml)
    assert wx.shop.reply_text(r) == WELCOME
    again = await wx.shop.post_xml(xml)  # WeChat's retry of the same event
    assert again.text == "success"
    conv = await eventually(lambda: _conversation_of(wx, user))
    rows = await wx.svc.services.host.list_messages(conv)
    assert [(m.sender, m.text) for m in rows if m.direction == "out"] == [("system", WELCOME)]
    assert [m.kind for m in rows if m.direction == "in"] == ["event:subscribe"]
    unsub = await wx.shop.post_xml(message_xml(user, {"MsgType": "event", "Event": "unsubscribe"}))
    assert unsub.text == "success"


async def _conversation_of(wx: Wx, user: str) -> int | None:
    async with wx.svc.services.sessions() as s:
        q = select(Conversation.id).where(Conversation.chat_id == user)
        return (await s.execute(q)).scalar_one_or_none()


async def test_voice_menu_and_media_messages(wx: Wx) -> None:
    user = openid()
    wx.api.user_wrote(user)
    voice_id = wx.shop.msg_id()
    voice = message_xml(
        user,
        {
            "MsgType": "voice",
            "MediaId": "m1",
            "Format": "amr",
            "Recognition": "我要退货",
            "MsgId": voice_id,
        },
    )
    r = await wx.shop.post_xml(voice)
    stored = await wx.inbound(voice_id)
    assert stored is not None and stored.text == "我要退货" and stored.kind == "voice"
    assert wx.shop.reply_text(r) == (await wx.settled_answer(voice_id)).text

    image_id = wx.shop.msg_id()
    image = {"MsgType": "image", "PicUrl": "http://x/p.jpg", "MediaId": "m2", "MsgId": image_id}
    r = await wx.shop.post_xml(message_xml(user, image))
    media_reply = wx.shop.reply_text(r)
    assert media_reply and "文字" in media_reply  # asks for a description in words
    assert await wx.answers(image_id) == []

    click = message_xml(user, {"MsgType": "event", "Event": "CLICK", "EventKey": "ORDER"})
    r = await wx.shop.post_xml(click)
    assert wx.shop.reply_text(r)  # the menu's question is answered like a message
    loc_id = wx.shop.msg_id()
    location = {
        "MsgType": "location",
        "Location_X": "31.23",
        "Location_Y": "121.47",
        "Scale": "15",
        "Label": "上海市黄浦区",
        "MsgId": loc_id,
    }
    await wx.shop.post_xml(message_xml(user, location))
    loc = await wx.inbound(loc_id)
    assert loc is not None and "上海市黄浦区" in loc.text and loc.kind == "location"

    for event in ({"Event": "VIEW", "EventKey": "https://shop.example/"}, {"Event": "SCAN"}):
        r = await wx.shop.post_xml(message_xml(user, {"MsgType": "event", **event}))
        assert r.text == "success"  # recorded, nothing to answer
    conv = await _conversation_of(wx, user)
    assert conv is not None
    kinds = [m.kind for m in await wx.svc.services.host.list_messages(conv)]
    assert "event:view" in kinds and "event:scan" in kinds


# -- the API's rules ---------------------------------------------------------------------------


async def test_an_expired_token_is_refreshed_and_the_send_retried_once(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    await wx.busy.send_text(user, "first [[sim:tokens=30]] [[sim:tps=20]]", msg_id)
    await wx.settled_answer(msg_id)
    fetched = len(wx.api.token_requests)
    assert fetched == 1
    conv = (await wx.conversation(msg_id)).id

    wx.api.expire_tokens()  # two hours pass
    sent = await wx.svc.services.host.send_message(conv, "您好，我是客服小王。", sender="agent")
    assert sent.status == "sent"
    assert wx.api.texts(user)[-1] == "您好，我是客服小王。"
    assert wx.api.errors == [("custom_send", 42001)]  # refused once, then retried once
    assert len(wx.api.token_requests) == fetched + 1


async def test_a_piece_wechat_calls_too_long_is_split_and_sent(wx: Wx) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    await wx.busy.send_text(user, "first [[sim:tokens=30]] [[sim:tps=20]]", msg_id)
    conv = (await wx.settled_answer(msg_id)).conversation_id
    text = "您好，我是客服小王，您的退款申请已经提交，预计三个工作日内原路退回，请留意账户变动。"
    wx.api.fail_next.append(45002)  # WeChat counts differently than we do, once
    sent = await wx.svc.services.host.send_message(conv, text, sender="agent")
    assert sent.status == "sent"
    assert ("custom_send", 45002) in wx.api.errors
    tail = wx.api.texts(user)[-2:]
    assert "".join(tail) == text and all(len(t.encode()) < len(text.encode()) for t in tail)


async def test_closed_window_marks_the_answer_undeliverable_and_asks_for_a_person(
    wx: Wx,
) -> None:
    user, msg_id = openid(), wx.busy.msg_id()
    r = await wx.busy.send_text(user, SLOW, msg_id)
    assert r.text == "success"
    wx.api.close_window(user)  # as if the shopper had written 48 hours ago
    answer = await wx.settled_answer(msg_id)
    assert answer.status == "undeliverable"
    assert (await wx.conversation(msg_id)).owner == "handoff_requested"
    assert wx.api.texts(user) == []
    assert ("custom_send", 45015) in wx.api.errors


async def test_spent_quota_keeps_what_was_sent_and_asks_for_a_person(wx: Wx) -> None:
    wx.api.quota_per_message = 1
    user, msg_id = openid(), wx.busy.msg_id()
    await wx.busy.send_text(user, LONG, msg_id)
    answer = await wx.settled_answer(msg_id)
    assert answer.status == "undeliverable"
    assert len(wx.api.texts(user)) == 1 and answer.text.startswith(wx.api.texts(user)[0])
    assert ("custom_send", 45047) in wx.api.errors
    assert (await wx.conversation(msg_id)).owner == "handoff_requested"


async def test_concurrent_tries_of_one_message_store_it_once(wx: Wx) -> None:
    user, msg_id = openid(), wx.shop.msg_id()
    xml = text_xml(user, "你们周末发货吗？", msg_id)
    wx.api.user_wrote(user)
    rs = await asyncio.gather(*(wx.shop.post_xml(xml) for _ in range(3)))
    answer = await wx.settled_answer(msg_id)
    texts = [wx.shop.reply_text(r) for r in rs]
    got = [t for t in texts if t] + wx.api.texts(user)
    assert got == [answer.text], "one answer, carried by exactly one of the tries"
    assert len(await wx.answers(msg_id)) == 1


# --- people: a person takes over, answers through the customer-service API, hands back ----


async def test_a_person_answers_through_the_api_and_hands_back(wx: Wx) -> None:
    from tests.test_agents_console import Console, _agent

    await _agent(wx.svc, "wang")
    wang = Console(wx.svc, "wang")
    try:
        await wang.sign_in()
        user, msg_id = openid(), wx.shop.msg_id()
        r = await wx.shop.send_text(user, "转人工", msg_id)
        assert r.status_code == 200
        told = await wx.settled_answer(msg_id)  # passively, or by the API on a slow day
        assert told.text == "人工客服稍后会加入对话。" and told.status == "sent"
        bot_texts = wx.api.texts(user)
        cid = (await wx.conversation(msg_id)).id
        assert [c["id"] for c in await wang.waiting()] == [cid]
        assert (await wang.post(f"/conversations/{cid}/claim")).status_code == 200
        r = await wang.post(f"/conversations/{cid}/reply", {"text": "您好，我是客服小王。"})
        assert r.status_code == 200 and r.json()["status"] == "sent"
        assert wx.api.texts(user) == [*bot_texts, "您好，我是客服小王。"]
        # While the person has it the bot stays silent: no passive reply, no API message.
        later = wx.shop.msg_id()
        r = await wx.shop.send_text(user, "我的订单 ORD-1001 到哪了？", later)
        assert wx.shop.reply_text(r) is None
        await eventually(lambda: _status_is(wx, later, "human"))
        assert wx.api.texts(user) == [*bot_texts, "您好，我是客服小王。"]
        assert (await wang.post(f"/conversations/{cid}/handback")).status_code == 200
        again = wx.shop.msg_id()
        await wx.shop.send_text(user, "那耳机可以退吗？", again)
        assert (await wx.settled_answer(again)).status == "sent"
    finally:
        await wang.close()


async def test_claim_while_pieces_stream_stops_the_pieces(wx: Wx) -> None:
    from tests.test_agents_console import Console, _agent

    await _agent(wx.svc, "wang")
    wang = Console(wx.svc, "wang")
    try:
        await wang.sign_in()
        user, msg_id = openid(), wx.busy.msg_id()
        slow_long = "给我详细讲讲这件羊毛大衣的面料和保养方法 [[sim:tokens=1400]] [[sim:tps=120]]"
        await wx.busy.send_text(user, slow_long, msg_id)

        async def first_piece() -> bool:
            return len(wx.api.texts(user, "custom")) >= 1

        await eventually(first_piece)
        cid = (await wx.conversation(msg_id)).id
        assert (await wang.post(f"/conversations/{cid}/claim")).status_code == 200
        pieces_then = len(wx.api.texts(user, "custom"))

        async def settled() -> Any:
            a = await wx.answers(msg_id)
            return a if a and a[0].status not in ("streaming", "pending") else None

        assert [a.status for a in await eventually(settled)] == ["abandoned"]
        await asyncio.sleep(1.0)  # what the bot would have sent meanwhile
        assert len(wx.api.texts(user, "custom")) <= pieces_then + 1  # one may have been on its way
    finally:
        await wang.close()


async def _status_is(wx: Wx, external_id: str, status: str) -> bool:
    m = await wx.inbound(external_id)
    return m is not None and m.status == status
