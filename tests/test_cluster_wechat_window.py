"""WeChat's 5-second window and WeCom bot streams across processes (queue.backend: redis).

Two channel instances on one Redis key prefix stand for two processes: the webhook request
(WeChat's callback or its retry, WeCom's poll) reaches one, the answer is written on the
other. The host is a stand-in for the pipeline that stores inbound messages idempotently, so
the test decides which "process" writes the answer and when; the channels, their HTTP routes,
the Redis board and the fake WeChat API are the real ones. The last tests run two whole
services on PostgreSQL and the Redis work queue.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from bot.settings import Settings
from channels.base import (
    Channel,
    ConversationRef,
    Delivery,
    InboundMessage,
    IngestResult,
    StoredMessage,
)
from channels.wechat.config import WechatSettings
from channels.wechat.official import OfficialAccountChannel
from channels.wechat.wecom import WecomChannel
from cluster.redis import RedisParts
from simulator.fakes.wechat_api import (
    FakeWechatApi,
    OfficialAccountClient,
    WecomBotClient,
    text_xml,
)
from storage.models import Message
from tests.redis_support import REDIS_URL, private_redis
from tests.support import RunningService, eventually, start_service

SECRET = "cluster-wx-secret"
BOT_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
HOLDING = "答案还在准备中，稍后发给您。"
ANSWER = "这件大衣是羊毛面料，建议干洗。"


class FakeHost:
    """The pipeline's side of ingest, shared by both "processes" (it is the database): a
    redelivered message is a duplicate whichever process it reaches."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, str, str | None], IngestResult] = {}
        self.messages: dict[int, InboundMessage] = {}
        self._ids = itertools.count(1)

    async def ingest(self, message: InboundMessage) -> IngestResult:
        key = (message.channel, message.account, message.external_id)
        seen = self.stored.get(key)
        if seen is not None:
            return replace(seen, duplicate=True)
        mid = next(self._ids)
        result = IngestResult(mid, conversation_id=1000 + mid, contact_id=1, seq=1, duplicate=False)
        self.stored[key] = result
        self.messages[mid] = message
        return result

    async def get_conversation(self, conversation_id: int) -> ConversationRef | None:
        for mid, m in self.messages.items():
            if 1000 + mid == conversation_id:
                return ConversationRef(conversation_id, m.channel, m.account, m.chat_id, 1, "bot")
        return None

    async def list_messages(self, conversation_id: int, **kw: Any) -> Sequence[StoredMessage]:
        return []

    def inbound(self, external_id: str) -> tuple[ConversationRef, StoredMessage] | None:
        """The stored message and its conversation, as the worker answering it sees them."""
        for (_, _, ext), r in self.stored.items():
            if ext == external_id:
                m = self.messages[r.message_id]
                conv = ConversationRef(r.conversation_id, m.channel, m.account, m.chat_id, 1, "bot")
                msg = StoredMessage(
                    r.message_id,
                    r.conversation_id,
                    r.seq,
                    "in",
                    "user",
                    m.kind,
                    m.text,
                    "received",
                    datetime.now(UTC),
                    external_id=ext,
                )
                return conv, msg
        return None


@dataclass
class Process:
    """One channel instance on its own port, sharing Redis with the others."""

    channel: Channel
    http: httpx.AsyncClient
    cluster: RedisParts


async def start_process(
    stack: AsyncExitStack, channel: Channel, host: FakeHost, redis_url: str, prefix: str
) -> Process:
    cluster = RedisParts.connect(redis_url, redis_url, redis_url, prefix)
    stack.push_async_callback(cluster.aclose)
    channel.share(cluster)
    app = web.Application()
    channel.register(app, host)  # type: ignore[arg-type]  # (the parts of the host it uses)
    await channel.start()
    stack.push_async_callback(channel.close)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stack.push_async_callback(runner.cleanup)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}", timeout=30)
    stack.push_async_callback(http.aclose)
    return Process(channel, http, cluster)


def wechat_settings(api_url: str) -> WechatSettings:
    common = {"secret_env": "WX_CLUSTER_WINDOW_SECRET"}
    return WechatSettings(
        enabled=True,
        api_base_url=api_url,
        wecom_api_base_url=api_url,
        official_accounts=[
            {
                "name": "shop",
                "path": "/wechat/shop",
                "appid": "wx_shop",
                "token": "shop-token",
                "passive_budget_seconds": 4.0,
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
        ],
        wecom_bots=[
            {
                "name": "helpdesk",
                "path": "/wecom/bot",
                "token": "bot-token",
                "aes_key_env": "WX_CLUSTER_BOT_KEY",
                "passive_budget_seconds": 0.3,
                "holding_text": HOLDING,
            },
            {
                "name": "patient",
                "path": "/wecom/patient",
                "token": "bot-token",
                "aes_key_env": "WX_CLUSTER_BOT_KEY",
                "passive_budget_seconds": 4.0,
                "holding_text": HOLDING,
            },
            {
                "name": "hurry",
                "path": "/wecom/hurry",
                "token": "bot-token",
                "aes_key_env": "WX_CLUSTER_BOT_KEY",
                "passive_budget_seconds": 0,
                "stream_ttl_seconds": 1.0,
                "holding_text": HOLDING,
            },
        ],
    )  # type: ignore[arg-type]


@dataclass
class Pair:
    """Two processes (`a`, `b`) of each WeChat channel, one fake WeChat, one host."""

    api: FakeWechatApi
    host: FakeHost
    oa: tuple[Process, Process]
    wecom: tuple[Process, Process]

    def shop(self, i: int, account: str = "shop") -> OfficialAccountClient:
        token = f"{account}-token"
        return OfficialAccountClient(
            self.oa[i].http, f"/wechat/{account}", token, appid=f"wx_{account}", api=self.api
        )

    def bot(self, i: int, path: str = "/wecom/bot") -> WecomBotClient:
        return WecomBotClient(self.wecom[i].http, path, "bot-token", BOT_AES_KEY, self.api)


async def open_pair(
    stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str
) -> Pair:
    monkeypatch.setenv("WX_CLUSTER_WINDOW_SECRET", SECRET)
    monkeypatch.setenv("WX_CLUSTER_BOT_KEY", BOT_AES_KEY)
    api = FakeWechatApi()
    await api.start()
    stack.push_async_callback(api.stop)
    for appid in ("wx_shop", "wx_busy"):
        api.add_official_account(appid, SECRET)
    host = FakeHost()
    settings = wechat_settings(api.base_url)

    async def two(make: Callable[[], Channel]) -> tuple[Process, Process]:
        a = await start_process(stack, make(), host, redis_url, prefix)
        b = await start_process(stack, make(), host, redis_url, prefix)
        return a, b

    oa = await two(lambda: OfficialAccountChannel(settings))
    wecom = await two(lambda: WecomChannel(settings))
    return Pair(api, host, oa, wecom)


@pytest.fixture
async def pair(monkeypatch: pytest.MonkeyPatch, redis_prefix: str) -> AsyncIterator[Pair]:
    async with AsyncExitStack() as stack:
        yield await open_pair(stack, monkeypatch, REDIS_URL, redis_prefix)


def openid() -> str:
    return "o_" + secrets.token_hex(6)


async def stored(host: FakeHost, external_id: str) -> tuple[ConversationRef, StoredMessage]:
    async def probe() -> tuple[ConversationRef, StoredMessage] | None:
        return host.inbound(external_id)

    return await eventually(probe)


async def window_opens(proc: Process, inbound_id: int) -> None:
    """Wait until a webhook request (on any process) waits for this answer."""
    ch = proc.channel
    assert isinstance(ch, OfficialAccountChannel)

    async def probe() -> bool:
        return await ch.board.window_left(inbound_id) is not None

    await eventually(probe)


async def answer_on(proc: Process, external_id: str, host: FakeHost, text: str) -> Delivery:
    """The worker on `proc` writes the answer: deltas, then the final text."""
    conv, msg = await stored(host, external_id)
    sink = proc.channel.open_reply(conv, msg)
    for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
        await sink.push(piece)
    return await sink.finish(text)


# -- the Official Account's 5-second window ---------------------------------------------------


async def test_a_callback_held_by_one_process_carries_the_answer_written_by_another(
    pair: Pair,
) -> None:
    user, msg_id = openid(), pair.shop(0).msg_id()
    callback = asyncio.create_task(pair.shop(0).send_text(user, "这件大衣是什么面料？", msg_id))
    _, msg = await stored(pair.host, msg_id)
    await window_opens(pair.oa[1], msg.id)

    delivery = await answer_on(pair.oa[1], msg_id, pair.host, ANSWER)

    r = await callback
    assert r.status_code == 200
    assert pair.shop(0).reply_text(r) == ANSWER, "process A's request carried B's answer"
    assert delivery.ok and delivery.platform_message_ids == ["passive"]
    assert pair.api.sent == [], "no customer-service message for a passive answer"


async def test_an_answer_ready_after_the_window_goes_once_through_the_api(pair: Pair) -> None:
    busy = pair.shop(0, "busy")  # a 1-second window
    user, msg_id = openid(), busy.msg_id()
    r = await busy.send_text(user, "这件大衣是什么面料？", msg_id)
    assert r.status_code == 200 and r.text == "success"  # nothing was ready in the window

    delivery = await answer_on(pair.oa[1], msg_id, pair.host, ANSWER)

    assert delivery.ok and delivery.platform_message_ids != ["passive"]
    assert pair.api.texts(user, "custom") == [ANSWER], "sent once, by the API"
    late = await pair.shop(1, "busy").post_xml(text_xml(user, "这件大衣是什么面料？", msg_id))
    assert late.status_code == 200 and late.text == "success"  # a retry after it: no repeat
    assert pair.api.texts(user, "custom") == [ANSWER]


async def test_a_retry_on_another_process_takes_over_the_window(pair: Pair) -> None:
    user, msg_id = openid(), pair.shop(0).msg_id()
    xml = text_xml(user, "这件大衣是什么面料？", msg_id)
    pair.api.user_wrote(user)
    first = asyncio.create_task(pair.shop(0).post_xml(xml))
    _, msg = await stored(pair.host, msg_id)
    await window_opens(pair.oa[0], msg.id)
    # WeChat gave up on the first request and retries: the retry reaches process B.
    retry = asyncio.create_task(pair.shop(1).post_xml(xml))
    r1 = await first  # superseded: it steps aside at once
    assert r1.status_code == 200 and r1.text == "success"
    await window_opens(pair.oa[0], msg.id)  # now B's request waits

    delivery = await answer_on(pair.oa[0], msg_id, pair.host, ANSWER)

    r2 = await retry
    assert pair.shop(1).reply_text(r2) == ANSWER
    assert delivery.platform_message_ids == ["passive"]
    assert pair.api.sent == [], "exactly one delivery: the retry's passive reply"
    assert len(pair.host.messages) == 1  # the retry was recognised as the same message


async def test_a_retry_after_a_lost_passive_reply_carries_it_again(pair: Pair) -> None:
    user, msg_id = openid(), pair.shop(0).msg_id()
    xml = text_xml(user, "这件大衣是什么面料？", msg_id)
    pair.api.user_wrote(user)
    first = asyncio.create_task(pair.shop(0).post_xml(xml))
    _, msg = await stored(pair.host, msg_id)
    await window_opens(pair.oa[1], msg.id)
    await answer_on(pair.oa[1], msg_id, pair.host, ANSWER)
    assert pair.shop(0).reply_text(await first) == ANSWER
    # WeChat did not get that reply (a network cut) and retries, on the other process.
    again = await pair.shop(1).post_xml(xml)
    assert pair.shop(1).reply_text(again) == ANSWER
    assert pair.api.sent == []


async def test_the_window_survives_a_redis_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with private_redis(tmp_path) as redis, AsyncExitStack() as stack:
        pair = await open_pair(stack, monkeypatch, redis.url, "sdwin")

        async def one_message() -> str | None:
            """A callback on A, the answer on B: exactly one delivery, whichever way."""
            user, msg_id = openid(), pair.shop(0).msg_id()
            callback = asyncio.create_task(pair.shop(0).send_text(user, "在吗？", msg_id))
            await stored(pair.host, msg_id)
            await asyncio.sleep(0.2)  # (A's request is waiting, or Redis could not be asked)
            delivery = await answer_on(pair.oa[1], msg_id, pair.host, ANSWER)
            passive = pair.shop(0).reply_text(await callback)
            by_api = pair.api.texts(user, "custom")
            assert delivery.ok
            assert [t for t in (passive,) if t] + by_api == [ANSWER], "exactly once"
            return passive

        assert await one_message() == ANSWER
        redis.stop()  # Redis is down: every answer goes by the API, once
        assert await one_message() is None
        await redis.start()  # back, empty: the processes reconnect and subscribe again

        async def passive_again() -> bool:
            return await one_message() == ANSWER

        assert await eventually(passive_again, timeout=30, every=0.1)


# -- WeCom bot streams ------------------------------------------------------------------------


async def test_a_stream_poll_on_another_process_shows_the_text_written_elsewhere(
    pair: Pair,
) -> None:
    member = "u_" + secrets.token_hex(5)
    payload = pair.bot(0).text_payload(member, "这件大衣是什么面料？")
    first = pair.bot(0).decode(await pair.bot(0).post(payload))
    assert first is not None and first["stream"]["finish"] is False
    sid = first["stream"]["id"]
    conv, msg = await stored(pair.host, payload["msgid"])
    sink = pair.wecom[0].channel.open_reply(conv, msg)  # A writes the answer...
    await sink.push("这件大衣")

    async def shown_on_b() -> str | None:  # ...WeCom's polls reach B
        reply = await pair.bot(1).poll(sid)
        assert reply is not None and reply["stream"]["finish"] is False
        return reply["stream"]["content"] or None

    assert await eventually(shown_on_b) == "这件大衣"
    await sink.push("是羊毛面料")
    delivery = await sink.finish(ANSWER)
    assert delivery.ok and delivery.platform_message_ids == [sid]
    stream, seen = await pair.bot(1).poll_until_finished(sid)
    assert stream["content"] == ANSWER
    assert all(ANSWER.startswith(c) for c in seen)
    assert pair.api.sent == []  # all of it in the stream, nothing by response_url


async def test_a_callback_retry_on_another_process_gets_the_answer_finished_elsewhere(
    pair: Pair,
) -> None:
    patient = pair.bot(1, "/wecom/patient")  # a 4-second first reply
    payload = patient.text_payload("u_" + secrets.token_hex(5), "这件大衣是什么面料？")
    first = asyncio.create_task(patient.post(payload))
    conv, msg = await stored(pair.host, payload["msgid"])
    sink = pair.wecom[0].channel.open_reply(conv, msg)
    await sink.push(ANSWER)
    await sink.finish(ANSWER)
    reply = patient.decode(await first)
    assert reply is not None
    assert reply["stream"] == {"id": reply["stream"]["id"], "finish": True, "content": ANSWER}


async def test_a_stream_closed_before_the_answer_sends_it_once_by_response_url(
    pair: Pair,
) -> None:
    hurry = pair.bot(1, "/wecom/hurry")  # streams live 1 s
    payload = hurry.text_payload("u_" + secrets.token_hex(5), "这件大衣是什么面料？")
    first = hurry.decode(await hurry.post(payload))
    assert first is not None and first["stream"]["finish"] is False
    sid = first["stream"]["id"]
    conv, msg = await stored(pair.host, payload["msgid"])
    sink = pair.wecom[0].channel.open_reply(conv, msg)
    await asyncio.sleep(1.2)  # past the stream's life
    closed = await hurry.poll(sid)  # B closes it with the holding text...
    assert closed is not None and closed["stream"]["finish"] is True
    assert closed["stream"]["content"].endswith(HOLDING)

    delivery = await sink.finish(ANSWER)  # ...so A sends the answer by the message's URL

    assert delivery.ok and delivery.platform_message_ids == ["response_url"]
    key = payload["response_url"].rsplit("/", 1)[1]
    assert pair.api.texts(key, "response_url") == [ANSWER]


async def test_an_agent_message_on_another_process_uses_the_chat_response_url_once(
    pair: Pair,
) -> None:
    payload = pair.bot(0).text_payload("u_" + secrets.token_hex(5), "我要找人工客服")
    assert (await pair.bot(0).post(payload)).status_code == 200  # the URL arrives at A
    conv, _ = await stored(pair.host, payload["msgid"])
    said = await pair.wecom[1].channel.send(conv, "您好，我是客服小王。", sender="agent")
    assert said.ok and said.platform_message_ids == ["response_url"]
    key = payload["response_url"].rsplit("/", 1)[1]
    assert pair.api.texts(key, "response_url") == ["您好，我是客服小王。"]
    again = await pair.wecom[0].channel.send(conv, "还在吗？", sender="agent")
    assert again.undeliverable, "a response_url works once, whichever process used it"


# -- two services on PostgreSQL and the Redis work queue --------------------------------------


async def _answers(svc: RunningService, external_id: str) -> list[Message]:
    async with svc.services.sessions() as s:
        q = select(Message.id).where(Message.external_id == external_id)
        inbound = (await s.execute(q)).scalar_one_or_none()
        if inbound is None:
            return []
        q2 = select(Message).where(Message.reply_to_id == inbound)
        return list((await s.execute(q2)).scalars())


async def test_two_services_deliver_a_wechat_answer_once_whichever_holds_the_request(
    monkeypatch: pytest.MonkeyPatch,
    pg: str,
    redis_prefix: str,
    settings_factory: Callable[..., Settings],
) -> None:
    monkeypatch.setenv("WX_CLUSTER_WINDOW_SECRET", SECRET)
    monkeypatch.setenv("WX_CLUSTER_BOT_KEY", BOT_AES_KEY)
    api = FakeWechatApi()
    await api.start()
    api.add_official_account("wx_shop", SECRET)
    api.add_official_account("wx_busy", SECRET)
    section = wechat_settings(api.base_url).model_dump(mode="json")
    settings = settings_factory(
        pg,
        channels={"wechat": section},
        queue={
            "backend": "redis",
            "url": REDIS_URL,
            "key_prefix": redis_prefix,
            "partitions": 4,
            "lease_seconds": 2,
            "sweep_seconds": 1,
        },
    )
    services = [await start_service(settings), await start_service(settings)]
    try:
        a, b = services
        shop_a = OfficialAccountClient(a.client, "/wechat/shop", "shop-token", appid="wx_shop")
        shop_b = OfficialAccountClient(b.client, "/wechat/shop", "shop-token", appid="wx_shop")
        # A slow answer (about 3 s): the first try waits on A, WeChat's retry lands on B.
        user, msg_id = openid(), shop_a.msg_id()
        api.user_wrote(user)
        xml = text_xml(user, "这件衣服是什么面料？ [[sim:tokens=30]] [[sim:tps=10]]", msg_id)
        first = asyncio.create_task(shop_a.post_xml(xml, timeout=10))
        await asyncio.sleep(0.5)
        retry = await shop_b.post_xml(xml, timeout=10)
        r1 = await first

        async def settled() -> list[Message] | None:
            got = await _answers(a, msg_id)
            return got if got and got[0].status in ("sent", "failed") else None

        answers = await eventually(settled, timeout=30)
        assert len(answers) == 1 and answers[0].status == "sent"
        passive = [t for t in (shop_a.reply_text(r1), shop_b.reply_text(retry)) if t]
        assert passive + api.texts(user, "custom") == [answers[0].text], "exactly once"
        assert shop_a.reply_text(r1) is None, "the first try stepped aside for the retry"

        # WeCom: the message reaches A, its polls reach B.
        bot_a = WecomBotClient(a.client, "/wecom/bot", "bot-token", BOT_AES_KEY, api)
        bot_b = WecomBotClient(b.client, "/wecom/bot", "bot-token", BOT_AES_KEY, api)
        payload = bot_a.text_payload("u_" + secrets.token_hex(5), "这件衣服是什么面料？")
        first_reply = bot_a.decode(await bot_a.post(payload))
        assert first_reply is not None
        stream, _ = await bot_b.poll_until_finished(first_reply["stream"]["id"])

        async def sent() -> list[Message] | None:
            got = await _answers(a, payload["msgid"])
            return got if got and got[0].status == "sent" else None

        (answer,) = await eventually(sent, timeout=30)
        assert stream["content"] == answer.text
    finally:
        for svc in services:
            await svc.stop()
        await api.stop()
