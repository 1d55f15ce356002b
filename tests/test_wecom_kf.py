"""WeChat Customer Service (微信客服) end to end: callbacks, pulls with `kf/sync_msg`, answers
through `kf/send_msg`, welcome messages, handoff to WeCom's reception, servicer messages,
against the fake KF API (simulator/fakes/wecom_kf_api.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from wechatpy.enterprise.crypto import PrpCrypto

from bot.settings import Settings
from simulator.fakes.wechat_api import sha1_sign
from simulator.fakes.wecom_kf_api import FakeKfApi, KfCallbackClient
from storage.models import Contact, Conversation, Message, WecomKfCursor
from tests.support import RunningService, eventually, start_service

CORP = "ww_test_corp"
SECRET = "kf-secret"
TOKEN = "kf-token"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
KFID = "wk_shop_service"
VIP = "wk_vip_service"
WELCOME = "您好，欢迎光临！有什么可以帮您？"
PATH = "/wecom/kf"


@dataclass
class Kf:
    svc: RunningService
    api: FakeKfApi
    http: httpx.AsyncClient
    wecom: KfCallbackClient
    settings: Settings

    async def rows(self, *where: Any) -> list[Message]:
        async with self.svc.services.sessions() as s:
            q = select(Message).where(*where).order_by(Message.id)
            return list((await s.execute(q)).scalars())

    async def answers_to(self, user: str) -> list[Message]:
        async with self.svc.services.sessions() as s:
            q = (
                select(Message)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.chat_id == user, Message.sender == "bot")
                .order_by(Message.seq)
            )
            return list((await s.execute(q)).scalars())

    async def settled(self, user: str, count: int = 1) -> list[Message]:
        async def probe() -> list[Message] | None:
            done = [
                a
                for a in await self.answers_to(user)
                if a.status in ("sent", "failed", "undeliverable")
            ]
            return done if len(done) >= count else None

        return await eventually(probe, timeout=30)

    async def count(self) -> int:
        async with self.svc.services.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)

    async def owner(self, user: str) -> str | None:
        async with self.svc.services.sessions() as s:
            q = select(Conversation.owner).where(Conversation.chat_id == user)
            return (await s.execute(q)).scalars().first()


def section(api: FakeKfApi, **over: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "corp_id": CORP,
        "secret_env": "KF_SECRET",
        "token": TOKEN,
        "aes_key_env": "KF_AES_KEY",
        "path": PATH,
        "api_base_url": api.base_url,
        "safety_pull_seconds": 0,
        "accounts": [
            {"name": "shop", "open_kfid": KFID, "welcome_text": WELCOME},
            {
                "name": "vip",
                "open_kfid": VIP,
                "handoff_to": "servicer",
                "servicer_userid": "lisi",
            },
        ],
        **over,
    }


async def _start(api: FakeKfApi, settings: Settings) -> tuple[RunningService, httpx.AsyncClient]:
    pulls = len(api.sync_requests)
    svc = await start_service(settings)
    # Each account pulls once at start (what arrived while down): let those finish first.
    await eventually(lambda: _async(len(api.sync_requests) >= pulls + 2))
    await asyncio.sleep(0.1)
    return svc, httpx.AsyncClient(base_url=svc.base_url, timeout=30)


@pytest.fixture
async def kf(
    monkeypatch: pytest.MonkeyPatch, db_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[Kf]:
    api = FakeKfApi(CORP, SECRET)
    await api.start()
    monkeypatch.setenv("KF_SECRET", SECRET)
    monkeypatch.setenv("KF_AES_KEY", AES_KEY)
    settings = settings_factory(db_url, channels={"wecom_kf": section(api)})
    svc, http = await _start(api, settings)
    env = Kf(svc, api, http, KfCallbackClient(http, PATH, TOKEN, AES_KEY, CORP), settings)
    yield env
    await env.http.aclose()
    await env.svc.stop()
    await api.stop()


def customer() -> str:
    return "wm" + secrets.token_hex(6)


async def test_a_customer_text_is_pulled_and_answered_once(kf: Kf) -> None:
    user = customer()
    msgid = kf.api.customer_writes(KFID, user, "这件羊毛大衣怎么保养？")
    r = await kf.wecom.notify(KFID)
    assert r.status_code == 200 and r.text == "success"
    [answer] = await kf.settled(user)
    assert answer.status == "sent" and answer.text
    assert kf.api.joined(user) == answer.text
    [inbound] = await kf.rows(Message.external_id == msgid)
    assert inbound.channel == "wecom_kf" and inbound.account == "shop"
    assert answer.reply_to_id == inbound.id
    # The API's msgid comes from our question's id: a retried piece is not shown twice.
    assert all(s.msgid.startswith(f"r{inbound.id}_") for s in kf.api.sent if s.to == user)
    # The profile from customer/batchget is on the contact.
    async with kf.svc.services.sessions() as s:
        contact = (await s.execute(select(Contact).where(Contact.external_id == user))).scalar_one()
    assert contact.display_name == f"顾客{user[-4:]}"
    assert contact.attributes["unionid"] == f"union-{user}"
    # The cursor is in the database.
    async with kf.svc.services.sessions() as s:
        cur = (await s.execute(select(WecomKfCursor))).scalars().all()
    assert ("shop", KFID) in [(c.account, c.open_kfid) for c in cur]


async def test_repeated_callbacks_answer_each_message_once_in_order(kf: Kf) -> None:
    user = customer()
    first = kf.api.customer_writes(KFID, user, "你们几点发货？")
    second = kf.api.customer_writes(KFID, user, "能开发票吗？")
    responses = await asyncio.gather(*(kf.wecom.notify(KFID) for _ in range(5)))
    assert all(r.status_code == 200 for r in responses)
    answers = await kf.settled(user, 2)
    await asyncio.sleep(0.5)  # let any extra pull run: it must not answer again
    assert len(await kf.answers_to(user)) == 2
    ids = {m.external_id: m.id for m in await kf.rows(Message.external_id.in_([first, second]))}
    assert [a.reply_to_id for a in answers] == [ids[first], ids[second]]
    assert kf.api.joined(user) == "".join(a.text for a in answers)


async def test_a_pull_cut_mid_way_resumes_from_the_last_whole_page(kf: Kf) -> None:
    user = customer()
    kf.svc.services.channels["wecom_kf"].pullers["shop"]._page_size = 2  # type: ignore[attr-defined]
    sent = [kf.api.customer_writes(KFID, user, f"第{i}个问题：尺码偏大吗？") for i in range(5)]
    kf.api.fail_sync_after = (1, 50001)  # page one is served, page two fails
    await kf.wecom.notify(KFID)
    await eventually(lambda: _stored(kf, sent[:2]))
    await eventually(lambda: _async(kf.api.errors))
    assert not await _stored(kf, sent[2:3])
    cut_at = kf.api.sync_requests[-1]["cursor"]
    kf.api.fail_sync_after = None
    again = len(kf.api.sync_requests)
    await kf.wecom.notify(KFID)
    answers = await kf.settled(user, 5)
    # The next pull started at the page that failed; each message stored and answered once.
    assert kf.api.sync_requests[again]["cursor"] == cut_at
    assert len(answers) == 5 and len(await kf.rows(Message.external_id.in_(sent))) == 5
    assert kf.api.joined(user) == "".join(a.text for a in answers)


async def _stored(kf: Kf, msgids: list[str]) -> bool:
    return len(await kf.rows(Message.external_id.in_(msgids))) == len(msgids)


async def test_restart_between_callback_and_pull_loses_nothing(
    kf: Kf, settings_factory: Callable[..., Settings]
) -> None:
    user = customer()
    first = kf.api.customer_writes(KFID, user, "有没有黑色的？")
    await kf.wecom.notify(KFID)
    await kf.settled(user)
    cursor_after_first = kf.api.sync_requests[-1].get("cursor")
    # The next callback is acknowledged, but the pull hangs; the service stops meanwhile.
    kf.api.hold_sync = asyncio.Event()
    second = kf.api.customer_writes(KFID, user, "黑色的有M码吗？")
    asked = len(kf.api.sync_requests)
    r = await kf.wecom.notify(KFID)
    assert r.status_code == 200
    await eventually(lambda: _asked(kf, asked))
    await kf.http.aclose()
    await kf.svc.stop()
    kf.api.hold_sync.set()
    kf.api.hold_sync = None
    # Started again: the pull at start begins at the cursor saved in the database.
    kf.svc, kf.http = await _start(kf.api, kf.settings)
    answers = await kf.settled(user, 2)
    assert len(answers) == 2 and kf.api.joined(user) == "".join(a.text for a in answers)
    # The hung pull and the first pull after the restart both start at the stored cursor.
    hung, resumed = [r for r in kf.api.sync_requests[asked:] if r["open_kfid"] == KFID][:2]
    assert hung["cursor"] == resumed["cursor"] and hung["cursor"] != cursor_after_first
    assert len(await kf.rows(Message.external_id.in_([first, second]))) == 2


async def _asked(kf: Kf, before: int) -> bool:
    return len(kf.api.sync_requests) > before


async def test_enter_session_sends_the_welcome_with_its_code(kf: Kf) -> None:
    user = customer()
    kf.api.enter_session(KFID, user)
    await kf.wecom.notify(KFID)
    welcome = await eventually(
        lambda: _first([s for s in kf.api.sent if s.to == user and s.api == "on_event"])
    )
    assert welcome.text == WELCOME
    stored = await eventually(lambda: _sent_system(kf, user))
    assert stored.text == WELCOME
    assert not await kf.answers_to(user)  # an event is not a question


async def _first(items: list[Any]) -> Any:
    return items[0] if items else None


async def _sent_system(kf: Kf, user: str) -> Message | None:
    async with kf.svc.services.sessions() as s:
        q = (
            select(Message)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.chat_id == user, Message.sender == "system")
        )
        m = (await s.execute(q)).scalars().first()
    return m if m is not None and m.status == "sent" else None


async def test_handoff_moves_the_session_to_the_pool_and_servicers_are_stored(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "转人工")
    await kf.wecom.notify(KFID)
    [answer] = await kf.settled(user)
    assert answer.status == "sent"  # the shopper is told before the session moves
    await eventually(lambda: _async(bool(kf.api.trans)))
    assert kf.api.trans == [(KFID, user, 2, "")]
    assert await kf.owner(user) == "handoff_requested"

    # A servicer takes the session in WeCom and writes; the customer answers them.
    kf.api.servicer_takes(KFID, user)
    said = kf.api.servicer_writes(KFID, user, "您好，我是客服小张，请问有什么可以帮您？")
    asked = kf.api.customer_writes(KFID, user, "我的订单还没到")
    await kf.wecom.notify(KFID)
    [agent] = await eventually(lambda: kf.rows(Message.external_id == said))
    assert (agent.sender, agent.direction, agent.status) == ("agent", "out", "sent")
    await eventually(lambda: kf.rows(Message.external_id == asked))
    await asyncio.sleep(0.5)
    assert len(await kf.answers_to(user)) == 1  # the bot stays silent
    assert len(kf.api.trans) == 1


async def _async(value: Any) -> Any:
    return value


async def test_handoff_to_a_configured_servicer(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(VIP, user, "帮我转接人工")
    await kf.wecom.notify(VIP)
    await kf.settled(user)
    await eventually(lambda: _async(bool(kf.api.trans)))
    assert kf.api.trans == [(VIP, user, 3, "lisi")]


async def test_a_servicer_taking_the_session_silences_the_bot(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "你好")
    await kf.wecom.notify(KFID)
    await kf.settled(user)
    kf.api.servicer_takes(KFID, user)
    question = kf.api.customer_writes(KFID, user, "还在吗？")
    await kf.wecom.notify(KFID)
    await eventually(lambda: kf.rows(Message.external_id == question))
    await eventually(lambda: _is(kf.owner(user), "human"))  # the servicer has it
    await asyncio.sleep(0.5)
    assert len(await kf.answers_to(user)) == 1
    assert kf.api.trans == []  # WeCom moved it already


async def test_a_session_the_servicer_ends_returns_to_the_bot(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "你好")
    await kf.wecom.notify(KFID)
    await kf.settled(user)
    kf.api.servicer_takes(KFID, user)
    await kf.wecom.notify(KFID)
    await eventually(lambda: _is(kf.owner(user), "human"))
    kf.api.session_ends(KFID, user)
    await kf.wecom.notify(KFID)
    await eventually(lambda: _is(kf.owner(user), "bot"))
    kf.api.customer_writes(KFID, user, "包邮吗？")
    await kf.wecom.notify(KFID)
    assert len(await eventually(lambda: _at_least(kf.answers_to(user), 2))) == 2


async def _at_least(rows: Any, n: int) -> Any:
    got = await rows
    return got if len(got) >= n else None


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_send_window_and_quota_errors_make_the_answer_undeliverable(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "包邮吗？")
    kf.api.close_window(KFID, user)
    await kf.wecom.notify(KFID)
    [answer] = await kf.settled(user)
    assert answer.status == "undeliverable"
    assert await eventually(lambda: _is(kf.owner(user), "handoff_requested"))
    assert kf.api.joined(user) == ""

    other = customer()
    kf.api.customer_writes(KFID, other, "包邮吗？")
    kf.api.fail_send.append(95001)
    await kf.wecom.notify(KFID)
    [answer] = await kf.settled(other)
    assert answer.status == "undeliverable"


async def test_media_and_voice_get_the_configured_texts(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, kind="image", media_id="MEDIA_1")
    kf.api.customer_writes(KFID, user, kind="voice", media_id="MEDIA_2")
    await kf.wecom.notify(KFID)

    async def two() -> list[str] | None:
        texts = kf.api.texts(user)
        return texts if len(texts) >= 2 else None

    texts = await eventually(two)
    assert any("图片" in t for t in texts) and any("语音" in t for t in texts)
    [image] = await kf.rows(Message.kind == "image")
    assert image.attachments == [{"type": "image", "media_id": "MEDIA_1"}]


async def test_bad_callbacks_are_refused_and_nothing_is_stored(kf: Kf) -> None:
    before, pulls = await kf.count(), len(kf.api.sync_requests)
    params, body = kf.wecom.body(kf.wecom.event_xml(KFID))
    bad_sig = await kf.http.post(PATH, params={**params, "msg_signature": "0" * 40}, content=body)
    assert bad_sig.status_code == 403 and bad_sig.json()["error"] == "invalid_signature"
    unsigned = await kf.http.post(PATH, content=body)
    assert unsigned.status_code == 403
    for junk in (
        b"",
        b"not xml",
        b"<xml><ToUserName>x</ToUserName></xml>",
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/hostname">]><xml><Encrypt>&e;</Encrypt></xml>',
        b"<xml><Encrypt>" + b"A" * 40_000 + b"</Encrypt></xml>",
    ):
        r = await kf.http.post(PATH, params=params, content=junk)
        assert r.status_code == 400, junk[:40]
    # Encrypted for another corp.
    other = KfCallbackClient(kf.http, PATH, TOKEN, AES_KEY, "ww_other_corp")
    p2, b2 = other.body(other.event_xml(KFID))
    assert (await kf.http.post(PATH, params=p2, content=b2)).status_code == 403
    # Well encrypted, but no OpenKfId.
    p3, b3 = kf.wecom.body(kf.wecom.event_xml(KFID).replace(f"<![CDATA[{KFID}]]>", ""))
    assert (await kf.http.post(PATH, params=p3, content=b3)).status_code == 400
    await asyncio.sleep(0.2)
    assert await kf.count() == before and len(kf.api.sync_requests) == pulls


async def test_url_verification(kf: Kf) -> None:
    plain = "1616140317555161061"
    echo = PrpCrypto(kf.wecom.crypto.key).encrypt(plain, CORP).decode()
    ts, nonce = "1409659589", "263014780"
    q = {"msg_signature": sha1_sign(TOKEN, ts, nonce, echo), "timestamp": ts, "nonce": nonce}
    r = await kf.http.get(PATH, params={**q, "echostr": echo})
    assert r.status_code == 200 and r.text == plain
    bad = await kf.http.get(PATH, params={**q, "msg_signature": "0" * 40, "echostr": echo})
    assert bad.status_code == 403


async def test_an_expired_access_token_is_renewed_once(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "今天能发货吗？")
    await kf.wecom.notify(KFID)
    await kf.settled(user)
    fetched = kf.api.calls["gettoken"]
    kf.api.expire_tokens()
    kf.api.customer_writes(KFID, user, "明天呢？")
    await kf.wecom.notify(KFID)
    answers = await kf.settled(user, 2)
    assert [a.status for a in answers] == ["sent", "sent"]
    assert kf.api.calls["gettoken"] == fetched + 1
    assert ("sync_msg", 42001) in kf.api.errors


async def test_a_send_wecom_reports_failed_later_is_marked_and_handed_over(kf: Kf) -> None:
    user = customer()
    kf.api.customer_writes(KFID, user, "包邮吗？")
    await kf.wecom.notify(KFID)
    [answer] = await kf.settled(user)
    assert answer.status == "sent"
    ours = [s.msgid for s in kf.api.sent if s.to == user and s.api == "send_msg"]
    kf.api.send_fails(KFID, user, ours[0])
    await kf.wecom.notify(KFID)
    assert await eventually(lambda: _is(kf.owner(user), "handoff_requested"))
    async with kf.svc.services.sessions() as s:
        row = await s.get(Message, answer.id)
        assert row is not None and row.status == "failed"
