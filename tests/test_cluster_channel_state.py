"""The channels' state shared by several processes through Redis (queue.backend: redis).

Two "processes" are two instances of a part, each with its own Redis connections, on one
key prefix: access tokens fetched once and invalidated for both, replayed nonces, Telegram's
Retry-After, the widget's limits, one WeChat Customer Service puller per account. A private
Redis restarted under them shows that an outage costs nothing worse than a forgotten limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiogram import Dispatcher
from sqlalchemy import func, select

from bot.settings import Settings
from channels.http import ApiError
from channels.telegram.client import BotClient
from channels.telegram.config import TelegramBotSettings
from channels.telegram.outbound import send_text
from channels.telegram.shared_pauses import SharedChatPauses
from channels.telegram.updates import Poller, UpdateFeed
from channels.wechat.api import OfficialAccountApi
from channels.wechat.kf_api import KfApi
from channels.wechat.kf_sync import Puller, redis_pull_guard
from channels.wechat.official import OfficialAccountChannel
from channels.wechat.redis_tokens import RedisTokenStore
from channels.wechat.replay import RedisNonceStore, ReplayGuard
from channels.widget.config import AttachmentSettings, RateLimitSettings
from channels.widget.shared_limits import SharedWidgetLimits
from cluster.redis import RedisParts
from cluster.renewed_lock import renewed_lock
from cluster.slots import SharedSlots
from simulator.fakes.telegram_api import FakeBotApi
from simulator.fakes.wechat_api import FakeWechatApi, OfficialAccountClient, text_xml
from simulator.fakes.wecom_kf_api import FakeKfApi
from storage import db as storage_db
from storage import executor
from storage.models import Message
from tests.redis_support import REDIS_URL, private_redis
from tests.support import eventually, start_service

SECRET = "app-secret"
APPID = "wx_shop"
TG_TOKEN = "123456:TEST-token_abc"
CORP, KFID = "ww_corp", "wk_shop"


def parts(url: str, prefix: str) -> RedisParts:
    return RedisParts.connect(url, url, url, prefix)


@pytest.fixture
async def two(redis_prefix: str) -> AsyncIterator[tuple[RedisParts, RedisParts]]:
    """Two processes' connections to the machine's Redis, on one prefix."""
    a, b = parts(REDIS_URL, redis_prefix), parts(REDIS_URL, redis_prefix)
    yield a, b
    await a.aclose()
    await b.aclose()


@pytest.fixture
async def wechat() -> AsyncIterator[FakeWechatApi]:
    api = FakeWechatApi()
    await api.start()
    api.add_official_account(APPID, SECRET)
    yield api
    await api.stop()


def oa_api(http: httpx.AsyncClient, fake: FakeWechatApi, cluster: RedisParts) -> OfficialAccountApi:
    return OfficialAccountApi(
        http,
        fake.base_url,
        account="shop",
        appid=APPID,
        secret=SECRET,
        store=RedisTokenStore(cluster.state, cluster.keys),
    )


# -- access tokens -------------------------------------------------------------------------------


async def test_concurrent_callers_in_two_processes_fetch_one_token(
    two: tuple[RedisParts, RedisParts], wechat: FakeWechatApi
) -> None:
    async with httpx.AsyncClient() as http:
        apis = [oa_api(http, wechat, c) for c in two]
        tokens = await asyncio.gather(*(api.token.get() for api in apis for _ in range(5)))
    assert len(set(tokens)) == 1
    assert len(wechat.token_requests) == 1


async def test_a_token_wechat_refuses_is_renewed_once_for_both_processes(
    two: tuple[RedisParts, RedisParts], wechat: FakeWechatApi
) -> None:
    openid = "o_" + secrets.token_hex(5)
    wechat.user_wrote(openid)
    async with httpx.AsyncClient() as http:
        a, b = (oa_api(http, wechat, c) for c in two)
        await a.send_text(openid, "one")
        await b.send_text(openid, "two")
        wechat.expire_tokens()  # two hours pass: WeChat answers 42001
        await a.send_text(openid, "three")  # refused, renewed, sent
        await b.send_text(openid, "four")  # takes the renewed token: no refusal, no fetch
    assert wechat.texts(openid) == ["one", "two", "three", "four"]
    assert len(wechat.token_requests) == 2
    assert [code for _, code in wechat.errors] == [42001]


# -- replay protection ---------------------------------------------------------------------------


async def test_a_nonce_seen_by_one_process_is_a_replay_for_the_other(
    two: tuple[RedisParts, RedisParts],
) -> None:
    a, b = (ReplayGuard(RedisNonceStore(c.state, c.keys)) for c in two)
    ts, nonce = str(int(time.time())), secrets.token_hex(5)
    await a.check("shop", ts, nonce, b"<xml>hello</xml>")
    await b.check("shop", ts, nonce, b"<xml>hello</xml>")  # WeChat's retry: same body
    with pytest.raises(ApiError) as refused:
        await b.check("shop", ts, nonce, b"<xml>forged</xml>")
    assert (refused.value.status, refused.value.code) == (403, "replayed")


# -- Telegram ------------------------------------------------------------------------------------


async def test_a_telegram_retry_after_seen_by_one_process_holds_the_others_sends(
    two: tuple[RedisParts, RedisParts],
) -> None:
    fake = FakeBotApi(usernames={TG_TOKEN: "shop_test_bot"})
    await fake.start()
    settings = TelegramBotSettings(account="default", api_base_url=fake.base_url or "")
    clients = [BotClient(settings, TG_TOKEN) for _ in two]
    for client, cluster in zip(clients, two, strict=True):
        client.pauses = SharedChatPauses(cluster, "default")
    chat = 4242
    try:
        fake.fail_next("sendMessage", chat_id=chat, retry_after=2)
        first = asyncio.create_task(send_text(clients[0], chat, "first"))
        b_pauses = clients[1].pauses
        assert b_pauses is not None
        await eventually(lambda: b_pauses.remaining(chat))  # A was told to wait
        await send_text(clients[1], chat, "second")
        await first
        # B waited out the pause A was given: Telegram saw no call during it.
        assert fake.violations == []
        assert sorted(m.text for m in fake.sent(chat)) == ["first", "second"]
    finally:
        for client in clients:
            await client.close()
        await fake.stop()


async def test_one_process_at_a_time_polls_a_telegram_bot(
    two: tuple[RedisParts, RedisParts],
) -> None:
    fake = FakeBotApi(usernames={TG_TOKEN: "shop_test_bot"})
    await fake.start()
    settings = TelegramBotSettings(account="default", api_base_url=fake.base_url or "")
    handled: list[tuple[int, int]] = []  # (process, update_id)
    pollers: list[Poller] = []
    clients: list[BotClient] = []
    for i, cluster in enumerate(two):
        client = BotClient(settings, TG_TOKEN)
        feed = UpdateFeed(Dispatcher(), client)

        async def record(update: Any, raw: Any, i: int = i) -> None:
            handled.append((i, update.update_id))

        feed.feed = record  # type: ignore[method-assign]

        def guard(account: str, cluster: RedisParts = cluster) -> Any:
            return renewed_lock(cluster.state, cluster.keys("tg_polling", account), lease_s=1.0)

        poller = Poller(feed, on_error_delay=0.1, guard=guard)
        poller.start()
        pollers.append(poller)
        clients.append(client)
    try:
        fake.push_update(TG_TOKEN, _update(1))
        await eventually(lambda: _true(bool(handled)))
        await asyncio.sleep(0.5)
        assert len(handled) == 1  # the other process did not poll
        polling = handled[0][0]
        await pollers[polling].stop()  # it stops (or dies): the other takes over
        fake.push_update(TG_TOKEN, _update(2))
        await eventually(lambda: _true((1 - polling, 2) in handled))
    finally:
        for poller in pollers:
            await poller.stop()
        for client in clients:
            await client.close()
        await fake.stop()


def _update(update_id: int) -> dict[str, Any]:
    user = {"id": 7, "is_bot": False, "first_name": "Ann"}
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": 7, "type": "private"},
            "from": user,
            "text": "hi",
        },
    }


# -- widget --------------------------------------------------------------------------------------


async def test_widget_limits_per_address_hold_across_processes(
    two: tuple[RedisParts, RedisParts],
) -> None:
    rl = RateLimitSettings(ip_connections=2, visitor_messages_per_minute=2)
    a, b = (SharedWidgetLimits(rl, AttachmentSettings(), c) for c in two)
    ip = f"203.0.113.{secrets.randbelow(250)}"
    first, second = await a.connect(ip), await b.connect(ip)
    assert first is not None and second is not None
    assert await a.connect(ip) is None and await b.connect(ip) is None  # the cap is 2 in all
    await a.disconnect(first)
    assert await b.connect(ip) is not None  # the seat A freed

    visitor = "v-" + secrets.token_hex(4)
    assert await a.message_wait(visitor, ip) == 0
    assert await b.message_wait(visitor, ip) == 0
    assert await a.message_wait(visitor, ip) > 0  # two a minute, wherever they land


async def test_seats_of_a_process_that_died_lapse(two: tuple[RedisParts, RedisParts]) -> None:
    dead = SharedSlots(two[0].state, two[0].keys("seats"), cap=1, lease_s=0.5)
    alive = SharedSlots(two[1].state, two[1].keys("seats"), cap=1, lease_s=0.5)
    assert await dead.claim("198.51.100.7") is not None  # never renewed, never released
    assert await alive.claim("198.51.100.7") is None
    assert await eventually(lambda: alive.claim("198.51.100.7"))


# -- WeChat Customer Service ---------------------------------------------------------------------


@pytest.fixture
async def kf_fake() -> AsyncIterator[FakeKfApi]:
    api = FakeKfApi(CORP, SECRET)
    await api.start()
    yield api
    await api.stop()


async def open_db(url: str) -> tuple[Any, executor.Database]:
    engine = storage_db.create_engine(url)
    await storage_db.upgrade(engine)
    return engine, executor.for_engine(engine)


def puller(
    cluster: RedisParts,
    http: httpx.AsyncClient,
    base_url: str,
    database: executor.Database,
    handle: Callable[[list[dict[str, Any]]], Any],
) -> Puller:
    api = KfApi(
        http,
        base_url,
        corp_id=CORP,
        secret=SECRET,
        store=RedisTokenStore(cluster.state, cluster.keys),
    )
    keys = cluster.keys
    guard = redis_pull_guard(cluster.state, lambda n: keys("wecom_kf_pull", n), lease_s=1.0)
    return Puller("shop", KFID, api, database, handle, asyncio.create_task, 100, guard)


async def test_one_process_at_a_time_pulls_a_customer_service_account(
    two: tuple[RedisParts, RedisParts], kf_fake: FakeKfApi, tmp_path: Path
) -> None:
    engine, database = await open_db(f"sqlite+aiosqlite:///{tmp_path / 'kf.db'}")
    kf_fake.customer_writes(KFID, "wm_1", "你好")
    inside, release = asyncio.Event(), asyncio.Event()
    seen_by_b: list[dict[str, Any]] = []

    async def a_stores(items: list[dict[str, Any]]) -> None:
        inside.set()
        await release.wait()  # a long page

    async def b_stores(items: list[dict[str, Any]]) -> None:
        seen_by_b.extend(items)

    async with httpx.AsyncClient() as http:
        a = puller(two[0], http, kf_fake.base_url, database, a_stores)
        b = puller(two[1], http, kf_fake.base_url, database, b_stores)
        a.kick()
        await asyncio.wait_for(inside.wait(), 10)
        b.kick()  # a callback that landed on the other process
        await asyncio.sleep(0.5)
        assert b.pulls == 0  # waits for A's pull to end
        release.set()
        await eventually(lambda: _true(b.pulls >= 1))
        assert a.pulls == 1
    await engine.dispose()


async def test_another_process_takes_over_the_pull_when_the_holder_dies(
    redis_prefix: str, two: tuple[RedisParts, RedisParts], kf_fake: FakeKfApi, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'kf.db'}"
    engine, database = await open_db(url)
    kf_fake.customer_writes(KFID, "wm_1", "你好")
    holder = _FrozenHolder(redis_prefix, url, kf_fake.base_url or "")
    holder.start()
    try:
        await eventually(lambda: _true(holder.pulling.is_set()))
        holder.freeze()  # the holder stops dead: no renewal, no release
        got: list[dict[str, Any]] = []

        async def b_stores(items: list[dict[str, Any]]) -> None:
            got.extend(items)

        async with httpx.AsyncClient() as http:
            b = puller(two[1], http, kf_fake.base_url, database, b_stores)
            b.kick()
            await eventually(lambda: _true(len(got) == 1))  # once the dead one's lease ran out
    finally:
        holder.thaw_and_close()
        await engine.dispose()


class _FrozenHolder:
    """A puller on its own event loop in a thread: a process we can stop dead mid-pull."""

    def __init__(self, prefix: str, db_url: str, api_url: str) -> None:
        self.prefix, self.db_url, self.api_url = prefix, db_url, api_url
        self.loop = asyncio.new_event_loop()
        self.pulling = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._closers: list[Callable[[], Any]] = []

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(RuntimeError):  # "stopped before Future completed": frozen
            self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        cluster = parts(REDIS_URL, self.prefix)
        http = httpx.AsyncClient()
        engine, database = await open_db(self.db_url)
        self._closers += [cluster.aclose, http.aclose, engine.dispose]

        async def hang(items: list[dict[str, Any]]) -> None:
            self.pulling.set()
            await asyncio.Event().wait()

        p = puller(cluster, http, self.api_url, database, hang)
        await p.pull()

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def thaw_and_close(self) -> None:
        async def close() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for closer in self._closers:
                with contextlib.suppress(Exception):
                    await closer()

        t = threading.Thread(target=lambda: self.loop.run_until_complete(close()))
        t.start()
        t.join(10)
        self.loop.close()


async def _true(value: bool) -> bool:
    return value


# -- Redis restarts ------------------------------------------------------------------------------


async def test_a_redis_restart_breaks_nothing(tmp_path: Path, wechat: FakeWechatApi) -> None:
    async with private_redis(tmp_path) as server, httpx.AsyncClient() as http:
        cluster = parts(server.url, "sd")
        api = oa_api(http, wechat, cluster)
        guard = ReplayGuard(RedisNonceStore(cluster.state, cluster.keys))
        widget = SharedWidgetLimits(RateLimitSettings(), AttachmentSettings(), cluster)
        pauses = SharedChatPauses(cluster, "default")
        openid = "o_" + secrets.token_hex(5)
        wechat.user_wrote(openid)
        try:
            await api.send_text(openid, "before")
            seat = await widget.connect("192.0.2.1")
            assert seat is not None

            server.stop()  # Redis is down: every part works on its own state
            await api.send_text(openid, "during")
            await guard.check("shop", str(int(time.time())), "n1", b"<xml/>")
            assert await widget.message_wait("v1", "192.0.2.1") == 0
            assert await widget.connect("192.0.2.1") is not None
            await widget.disconnect(seat)
            assert await pauses.remaining(1) == 0.0
            await pauses.hold(1, 5)

            await server.start()  # back, empty: the shared state is made again
            await api.send_text(openid, "after")

            async def shared_again() -> float:
                await pauses.hold(1, 5)
                return await pauses.remaining(1)

            assert await eventually(shared_again) > 0
            assert await widget.connect("192.0.2.1") is not None
        finally:
            await cluster.aclose()
    assert wechat.texts(openid) == ["before", "during", "after"]


# -- redelivery ----------------------------------------------------------------------------------


async def test_a_wechat_retry_on_another_process_is_stored_once(
    monkeypatch: pytest.MonkeyPatch,
    pg: str,
    redis_prefix: str,
    wechat: FakeWechatApi,
    settings_factory: Callable[..., Settings],
) -> None:
    monkeypatch.setenv("WX_TEST_SECRET", SECRET)
    section = {
        "enabled": True,
        "api_base_url": wechat.base_url,
        "official_accounts": [
            {
                "name": "shop",
                "path": "/wechat/shop",
                "appid": APPID,
                "token": "shop-token",
                "secret_env": "WX_TEST_SECRET",
                "passive_budget_seconds": 1.0,
            }
        ],
    }
    settings = settings_factory(
        pg,
        queue={"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix},
        channels={"wechat": section},
    )
    services = [await start_service(settings)]
    try:
        services.append(await start_service(settings))
        openid, msg_id = "o_" + secrets.token_hex(5), str(secrets.randbelow(10**15))
        wechat.user_wrote(openid)
        xml = text_xml(openid, "你好", msg_id)
        for svc in services:  # the channel keeps its state in Redis
            channel = svc.services.channels["wechat"]
            assert isinstance(channel, OfficialAccountChannel)
            assert isinstance(channel.replay.store, RedisNonceStore)
        for svc in services:  # WeChat's retry reaches the other process
            async with httpx.AsyncClient(base_url=svc.base_url, timeout=30) as http:
                client = OfficialAccountClient(http, "/wechat/shop", "shop-token", appid=APPID)
                r = await client.post_xml(xml, timeout=30)
                assert r.status_code == 200
        async with services[0].services.sessions() as s:
            q = select(func.count()).where(Message.external_id == msg_id)
            assert await s.scalar(q) == 1
    finally:
        for svc in services:
            await svc.stop()
