"""Fuzzing every entry point with Hypothesis: the HTTP API's JSON, query strings and headers,
the widget's frames, posts and uploads, Telegram updates, WeChat/WeCom XML and their crypto
envelopes. Each case must get a 2xx or a JSON 4xx (never a 5xx, never a broken socket); a
refused case must store nothing; after each entry point the service still answers.

One service runs in its own event-loop thread (with the model simulator and the fake
platforms); Hypothesis drives it from the calling thread. `tests/test_fuzz_entry_points.py`
runs a short profile, `python -m bench fuzz --cases N` the long one.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from wechatpy.crypto import WeChatCrypto
from wechatpy.enterprise.crypto import PrpCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto

from bench.service_config import base_service_config, deep_merge, one_specialist_sections
from bot.app import SERVICES, Services, build_app
from bot.settings import Settings
from simulator.config import SimulatorConfig
from simulator.fakes.telegram_api import FakeBotApi
from simulator.fakes.wechat_api import FakeWechatApi, sha1_sign
from simulator.server import Simulator
from storage.models import Message

T = TypeVar("T")

API_KEY = "fuzz-api-key"
TG_TOKEN = "123456:FUZZ-token_abc"
TG_SECRET = "fuzz-secret_1"
TG_PATH = "/telegram/default/webhook"
ORIGIN = "http://shop.test"
WIDGET_SECRET = "fuzz-widget-secret"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 chars, as WeChat's console gives
OA_TOKEN, SAFE_TOKEN, APP_TOKEN, BOT_TOKEN = "oa-token", "safe-token", "app-token", "bot-token"
APPID, CORP_ID, AGENT_ID = "wx_fuzz", "ww_fuzz", 1000002
ENV = {
    "SWARMDESK_API_KEY": API_KEY,
    "TELEGRAM_BOT_TOKEN": TG_TOKEN,
    "TELEGRAM_WEBHOOK_SECRET": TG_SECRET,
    "FUZZ_WIDGET_SECRET": WIDGET_SECRET,
    "FUZZ_WX_SECRET": "wx-secret",
    "FUZZ_AES_KEY": AES_KEY,
}


def service_config(port_sim: int, db_url: str, tmp: Path, tg_url: str, wx_url: str) -> Settings:
    """Every channel on, limits out of the fuzzer's way (it comes from one address), the
    simulator answering at once."""
    config = deep_merge(
        base_service_config(0, db_url),
        one_specialist_sections(
            port_sim, max_concurrency=64, turn_deadline_s=10, specialist_timeout_s=8
        ),
    )
    config["log"] = {"format": "console", "level": "error"}
    # The demo's shop, tools and FAQ give the fuzzer more code to reach.
    config["demo"] = {"allow": ["demo_shop", "demo_tools", "builtin_faq"]}
    callback = {"secret_env": "FUZZ_WX_SECRET"}
    config["channels"] = {
        "widget": {
            "sites": [
                {
                    "key": "shop",
                    "name": "Fuzz shop",
                    "allowed_origins": [ORIGIN],
                    "identity_secret_env": "FUZZ_WIDGET_SECRET",
                }
            ],
            "demo_site": None,
            "attachments": {"dir": str(tmp / "uploads"), "max_bytes": 64 * 1024},
            "rate_limits": {
                "visitor_messages_per_minute": 1_000_000,
                "ip_messages_per_minute": 1_000_000,
                "ip_connections": 1000,
            },
        },
        "telegram": {"enabled": True, "bots": [{"account": "default", "api_base_url": tg_url}]},
        "wechat": {
            "enabled": True,
            "api_base_url": wx_url,
            "wecom_api_base_url": wx_url,
            "official_accounts": [
                {
                    "name": "plain",
                    "path": "/wechat/plain",
                    "appid": APPID,
                    "token": OA_TOKEN,
                    "passive_budget_seconds": 0.05,
                    **callback,
                },
                {
                    "name": "safe",
                    "path": "/wechat/safe",
                    "appid": APPID,
                    "token": SAFE_TOKEN,
                    "aes_key_env": "FUZZ_AES_KEY",
                    "encryption": "safe",
                    "passive_budget_seconds": 0.05,
                    **callback,
                },
            ],
            "wecom_apps": [
                {
                    "name": "staff",
                    "path": "/wecom/staff",
                    "corp_id": CORP_ID,
                    "agent_id": AGENT_ID,
                    "token": APP_TOKEN,
                    "aes_key_env": "FUZZ_AES_KEY",
                    **callback,
                }
            ],
            "wecom_bots": [
                {
                    "name": "helpdesk",
                    "path": "/wecom/bot",
                    "token": BOT_TOKEN,
                    "aes_key_env": "FUZZ_AES_KEY",
                    "passive_budget_seconds": 0,
                }
            ],
        },
    }
    return Settings(**config)


# -- the service in its own loop -------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    body: bytes = b""
    json_error: bool = False  # a 4xx with {"error": ...}
    note: str = ""  # for sockets: how the exchange ended


@dataclass
class Tally:
    """Cases per entry point, by class of answer."""

    counts: dict[str, collections.Counter[str]] = field(default_factory=dict)

    def add(self, target: str, kind: str) -> None:
        self.counts.setdefault(target, collections.Counter())[kind] += 1

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


class FuzzedService:
    """The service, the simulator and the fake Telegram and WeChat servers, in a thread."""

    def __init__(self, tmp: Path, db_url: str | None = None) -> None:
        self.tmp = tmp
        self.db_url = db_url or f"sqlite+aiosqlite:///{tmp / 'fuzz.db'}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-service")
        self._stack = contextlib.AsyncExitStack()
        self.tally = Tally()
        self._env: dict[str, str | None] = {}
        self.http: httpx.AsyncClient
        self.ws_session: aiohttp.ClientSession
        self.services: Services
        self.base_url = ""

    # sync face (the Hypothesis side)

    def start(self) -> FuzzedService:
        for k, v in ENV.items():
            self._env[k] = os.environ.get(k)
            os.environ[k] = v
        self._thread.start()
        self.run(self._start())
        return self

    def stop(self) -> None:
        try:
            self.run(self._stack.aclose(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
            for k, old in self._env.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def check(self, target: str, send: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One case: never a 5xx; a 4xx is JSON and stored nothing."""
        before = self.run(self.inbound())
        out = self.run(send())
        kind = f"{out.status // 100}xx" if out.status else out.note
        self.tally.add(target, kind)
        assert out.status < 500, f"{target}: {out.status} {out.body[:300]!r}"
        if 400 <= out.status < 500:
            assert out.json_error, f"{target}: a {out.status} without a JSON error: {out.body!r}"
            after = self.run(self.inbound())
            assert after == before, f"{target}: refused ({out.status}) but stored a message"
        return out

    def assert_healthy(self) -> None:
        self.run(self._healthy(), timeout=90)

    # async side (in the service's loop)

    async def _start(self) -> None:
        stack = self._stack
        sim = Simulator(SimulatorConfig(first_token_ms=0, tokens_per_second=0, reply_tokens=6))
        await sim.start()
        stack.push_async_callback(sim.stop)
        tg = FakeBotApi(usernames={TG_TOKEN: "fuzz_bot"})
        await tg.start()
        stack.push_async_callback(tg.stop)
        wx = FakeWechatApi()
        await wx.start()
        wx.add_official_account(APPID, "wx-secret")
        wx.add_corp_app(CORP_ID, "wx-secret")
        stack.push_async_callback(wx.stop)
        sim_port = int((sim.base_url or "").rsplit(":", 1)[1].split("/")[0])
        settings = service_config(
            sim_port, self.db_url, self.tmp, tg.base_url or "", wx.base_url or ""
        )
        app = build_app(settings)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.services = app[SERVICES]
        self.services.listening_on(self.base_url)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=30)
        stack.push_async_callback(self.http.aclose)
        self.ws_session = aiohttp.ClientSession()
        stack.push_async_callback(self.ws_session.close)

    async def inbound(self) -> int:
        async with self.services.sessions() as s:
            q = select(func.count()).select_from(Message).where(Message.direction == "in")
            return int((await s.execute(q)).scalar_one())

    async def _healthy(self) -> None:
        r = await self.http.get("/healthz")
        assert r.status_code == 200, f"/healthz: {r.status_code}"
        posted = await self.http.post(
            "/api/v1/messages",
            json={"contact_id": f"health-{secrets.token_hex(4)}", "text": "are you there?"},
            headers={"X-Api-Key": API_KEY},
        )
        assert posted.status_code == 202, posted.text
        body = posted.json()
        url = f"/api/v1/conversations/{body['conversation_id']}/messages"
        for _ in range(600):
            got = await self.http.get(url, headers={"X-Api-Key": API_KEY})
            if any(m["reply_to_id"] == body["message_id"] for m in got.json()["messages"]):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the service no longer answers a plain message")


async def outcome(r: httpx.Response) -> Outcome:
    error = False
    if 400 <= r.status_code < 500:
        try:
            error = isinstance(json.loads(r.content), dict) and "error" in json.loads(r.content)
        except ValueError:
            error = False
    return Outcome(r.status_code, r.content, error)


# -- what inputs look like ---------------------------------------------------------------------

# Integers around the edges of 32/64 bits and the ids the service hands out.
edge_ints = st.sampled_from(
    [0, -1, 1, 2, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]
)
ints = st.one_of(st.integers(), edge_ints)
# Text with what breaks storage and parsers: lone surrogates, NUL, controls, RTL, emoji.
nasty_chars = st.sampled_from(["\ud800", "\udfff", "\x00", "\x1b", "\u202e", "\ufeff", "😀", "ß"])
# Text a person writes (any script, no controls or surrogates): what gets past validation.
plain = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
).filter(str.strip)
texts = st.one_of(
    plain,
    plain,
    st.text(max_size=40),
    st.lists(st.one_of(st.characters(), nasty_chars), max_size=12).map("".join),
    st.text(alphabet="0123456789-.e+ ", max_size=25),
    st.integers(0, 70_000).map(lambda n: "x" * n),
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
nested = st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a client would send it (lone surrogates escaped, as JSON allows)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def bodies(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """A JSON body: mostly the route's own fields with odd values, else anything at all."""
    return st.one_of(
        st.tuples(fields, st.booleans()).map(lambda t: encode(*t)),
        st.tuples(fields, st.booleans()).map(lambda t: encode(*t)),
        st.tuples(fields, st.booleans()).map(lambda t: encode(*t)),
        st.tuples(json_values, st.booleans()).map(lambda t: encode(*t)),
        nested.map(str.encode),
        st.binary(max_size=200),
        st.tuples(fields, st.binary(max_size=8), st.integers(0, 200)).map(
            lambda t: _splice(encode(t[0], True), t[1], t[2])
        ),
    )


def _splice(data: bytes, junk: bytes, at: int) -> bytes:
    at = min(at, len(data))
    return data[:at] + junk + data[at:]


def field_values() -> st.SearchStrategy[Any]:
    return st.one_of(texts, texts, ints, json_values)


def api_fields() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"contact_id": st.one_of(plain, texts, ints), "text": st.one_of(plain, texts)},
        optional={
            "client_message_id": st.one_of(plain, field_values()),
            "contact_name": st.one_of(plain, field_values()),
            "conversation_id": st.one_of(ints, field_values()),
            "extra": json_values,
        },
    )


good_token = st.one_of(
    st.just("fuzz-visitor-token-000000000001"), st.builds(lambda: secrets.token_urlsafe(24))
)
tokens = st.one_of(good_token, good_token, texts)
client_ids = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1, max_size=64),
    st.text(max_size=70),
    ints,
)


def widget_fields() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"token": tokens, "client_id": client_ids, "text": st.one_of(plain, texts)},
        optional={
            "attachments": st.one_of(st.lists(field_values(), max_size=6), json_values),
            "user": st.one_of(
                st.fixed_dictionaries({"id": field_values(), "hash": field_values()}), json_values
            ),
            "type": st.sampled_from(["send", "hello", "ping", "x"]),
            "conversation_id": ints,
            "after": ints,
            "delta": st.one_of(st.lists(ints, max_size=3), json_values),
        },
    )


# What HTTP carries in a header value (clients strip the ends; aiohttp refuses controls and
# lines over 8 KiB itself, with its own plain-text 400, before any route runs).
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
).map(str.strip)
query_values = st.one_of(header_text, ints.map(str), st.sampled_from(["", "-1", "0", "²", "1e3"]))


# -- entry points ------------------------------------------------------------------------------


Case = Callable[[FuzzedService, Any], None]


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    case: Case


def api_message(svc: FuzzedService, data: tuple[bytes, str, str]) -> None:
    body, content_type, key = data
    headers = {"X-Api-Key": key, "Content-Type": content_type}
    svc.check("api-json", lambda: _post(svc, "/api/v1/messages", body, headers))


async def _post(
    svc: FuzzedService, path: str, body: bytes, headers: dict[str, str], **params: str
) -> Outcome:
    return await outcome(await svc.http.post(path, content=body, headers=headers, params=params))


def api_query(svc: FuzzedService, data: tuple[str, dict[str, str], str | None, bool]) -> None:
    conv, params, last_event_id, stream = data
    headers = {"X-Api-Key": API_KEY}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    path = f"/api/v1/conversations/{conv}/{'stream' if stream else 'messages'}"
    svc.check("api-query", lambda: _get(svc, path, params, headers))


async def _get(
    svc: FuzzedService, path: str, params: dict[str, str], headers: dict[str, str]
) -> Outcome:
    # A stream that opens is a success: read its status, not the endless body.
    async with svc.http.stream("GET", path, params=params, headers=headers) as r:
        if r.status_code == 200 and r.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            return Outcome(200)
        await r.aread()
        return await outcome(r)


def widget_post(svc: FuzzedService, data: tuple[bytes, str, str]) -> None:
    body, site, origin = data
    headers = {"Origin": origin, "Content-Type": "application/json"}
    svc.check("widget-post", lambda: _post(svc, "/widget/v1/messages", body, headers, site=site))


def widget_upload(svc: FuzzedService, data: tuple[bytes, str, str]) -> None:
    body, token, content_type = data
    headers = {"Origin": ORIGIN, "X-Widget-Token": token, "Content-Type": content_type}
    svc.check("widget-upload", lambda: _post(svc, "/widget/v1/uploads", body, headers, site="shop"))


def widget_events(svc: FuzzedService, params: dict[str, str]) -> None:
    svc.check("widget-events", lambda: _get(svc, "/widget/v1/events", params, {"Origin": ORIGIN}))


def widget_frames(svc: FuzzedService, data: tuple[bytes | None, list[bytes | str]]) -> None:
    hello, frames = data
    svc.check("widget-socket", lambda: _socket(svc, hello, frames))


async def _socket(svc: FuzzedService, hello: bytes | None, frames: list[bytes | str]) -> Outcome:
    """Hello (a good one, or fuzzed), the fuzzed frames, then a ping that must get its pong;
    the only closes allowed are the ones the protocol names (4400 a bad hello, 1009 a frame
    over the hard cap)."""
    url = svc.base_url.replace("http", "ws") + "/widget/v1/ws?site=shop"
    async with svc.ws_session.ws_connect(url, headers={"Origin": ORIGIN}, max_msg_size=0) as ws:
        good = {"type": "hello", "token": secrets.token_urlsafe(24)}
        await ws.send_bytes(hello) if hello is not None else await ws.send_json(good)
        for f in frames:
            await (ws.send_str(f) if isinstance(f, str) else ws.send_bytes(f))
        await ws.send_str('{"type":"ping"}')
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type == aiohttp.WSMsgType.TEXT:
                if json.loads(msg.data).get("type") == "pong":
                    return Outcome(101, note="pong")
                continue
            code = ws.close_code
            if code == 4400 and hello is not None:
                return Outcome(101, note="closed-4400")
            if code == 1009:
                return Outcome(101, note="closed-1009")
            return Outcome(500, f"socket ended: {msg.type.name} code {code}".encode())


def telegram_update(svc: FuzzedService, data: tuple[bytes, str]) -> None:
    body, secret = data
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret, "Content-Type": "application/json"}
    svc.check("telegram", lambda: _post(svc, TG_PATH, body, headers))


def _signed(token: str, *extra: str) -> dict[str, str]:
    ts, nonce = str(int(time.time())), secrets.token_hex(6)
    return {
        "signature": sha1_sign(token, ts, nonce),
        "msg_signature": sha1_sign(token, ts, nonce, *extra),
        "timestamp": ts,
        "nonce": nonce,
    }


def wechat_plain(svc: FuzzedService, data: tuple[bytes, dict[str, str]]) -> None:
    body, query = data
    params = {**_signed(OA_TOKEN), **query}
    params.pop("msg_signature")
    svc.check("wechat-xml", lambda: _post(svc, "/wechat/plain", body, {}, **params))


_oa_crypto = WeChatCrypto(SAFE_TOKEN, AES_KEY, APPID)
_app_crypto = EnterpriseCrypto(APP_TOKEN, AES_KEY, CORP_ID)
_bot_crypto = EnterpriseCrypto(BOT_TOKEN, AES_KEY, "")


def _encrypt(inner: bytes, receiver: str) -> str:
    """Encrypt as the platform does (the inner bytes as text, errors kept as U+FFFD)."""
    enc: bytes = PrpCrypto(_oa_crypto.key).encrypt(inner.decode("utf-8", "replace"), receiver)
    return enc.decode()


def wechat_safe(svc: FuzzedService, data: tuple[bytes, str, bool]) -> None:
    """Safe mode: the inner XML encrypted and signed right (the parser behind the crypto),
    or a junk <Encrypt> signed right (the decryption's own errors)."""
    inner, junk, encrypted = data
    enc = _encrypt(inner, APPID) if encrypted else junk
    body = f"<xml><ToUserName>gh</ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
    params = {**_signed(SAFE_TOKEN, enc), "encrypt_type": "aes"}
    svc.check(
        "wechat-safe",
        lambda: _post(svc, "/wechat/safe", body.encode("utf-8", "replace"), {}, **params),
    )


def wecom_app(svc: FuzzedService, data: tuple[bytes, str, bool]) -> None:
    inner, junk, encrypted = data
    enc = _encrypt(inner, CORP_ID) if encrypted else junk
    body = f"<xml><ToUserName>{CORP_ID}</ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
    params = _signed(APP_TOKEN, enc)
    params.pop("signature")
    svc.check(
        "wecom-app",
        lambda: _post(svc, "/wecom/staff", body.encode("utf-8", "replace"), {}, **params),
    )


def wecom_bot(svc: FuzzedService, data: tuple[bytes, str, bool]) -> None:
    inner, junk, encrypted = data
    enc = _encrypt(inner, "") if encrypted else junk
    params = _signed(BOT_TOKEN, enc)
    params.pop("signature")
    body = json.dumps({"encrypt": enc}).encode()
    svc.check("wecom-bot", lambda: _post(svc, "/wecom/bot", body, {}, **params))


def headers_anywhere(
    svc: FuzzedService, data: tuple[str, str, dict[str, str], dict[str, str]]
) -> None:
    method, path, headers, params = data
    svc.check("headers-query", lambda: _any(svc, method, path, headers, params))


async def _any(
    svc: FuzzedService, method: str, path: str, headers: dict[str, str], params: dict[str, str]
) -> Outcome:
    if method == "GET":
        return await _get(svc, path, params, headers)
    r = await svc.http.request(method, path, headers=headers, params=params, content=b"{}")
    return await outcome(r)


def _xml_value(v: str) -> str:
    return v.replace("]]>", "]]]]><![CDATA[>")


def wechat_xml(receiver_tag: str = "ToUserName") -> st.SearchStrategy[bytes]:
    """A WeChat message as XML with odd fields, or broken XML."""
    fields = st.fixed_dictionaries(
        {
            "ToUserName": st.one_of(plain, texts),
            "FromUserName": st.one_of(plain, texts),
            "CreateTime": st.one_of(st.integers(0, 2**32).map(str), ints.map(str), texts),
            "MsgType": st.sampled_from(
                [
                    "text",
                    "text",
                    "text",
                    "image",
                    "voice",
                    "video",
                    "location",
                    "link",
                    "event",
                    "x",
                ]
            ),
        },
        optional={
            "Content": st.one_of(plain, texts),
            "MsgId": st.one_of(ints.map(str), texts),
            "Event": st.sampled_from(["subscribe", "unsubscribe", "CLICK", "x"]),
            "EventKey": texts,
            "Recognition": texts,
            "AgentID": st.one_of(ints.map(str), texts),
            "PicUrl": texts,
            "MediaId": texts,
        },
    )

    def render(f: dict[str, str]) -> bytes:
        parts = "".join(f"<{k}><![CDATA[{_xml_value(v)}]]></{k}>" for k, v in f.items())
        return f"<xml>{parts}</xml>".encode("utf-8", "replace")

    return st.one_of(
        fields.map(render),
        fields.map(render),
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")),
        st.integers(1, 3000).map(lambda n: ("<a>" * n + "</a>" * n).encode()),
        st.just(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml>&e;</xml>'),
    )


def telegram_updates() -> st.SearchStrategy[dict[str, Any]]:
    user = st.fixed_dictionaries(
        {"id": ints, "is_bot": st.booleans(), "first_name": texts},
        optional={"username": texts, "language_code": texts},
    )
    chat = st.fixed_dictionaries(
        {"id": ints, "type": st.sampled_from(["private", "group", "supergroup", "channel", "x"])}
    )
    message = st.fixed_dictionaries(
        {"message_id": ints, "date": ints, "chat": chat},
        optional={
            "from": user,
            "text": texts,
            "caption": texts,
            "entities": json_values,
            "photo": json_values,
            "reply_to_message": json_values,
        },
    )
    return st.fixed_dictionaries(
        {"update_id": ints},
        optional={
            "message": message,
            "edited_message": message,
            "callback_query": json_values,
            "my_chat_member": json_values,
        },
    )


def bot_payloads() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"msgtype": st.sampled_from(["text", "stream", "event", "image", "mixed", "x"])},
        optional={
            "msgid": field_values(),
            "aibotid": field_values(),
            "chattype": st.sampled_from(["single", "group", "x"]),
            "chatid": field_values(),
            "from": st.one_of(st.fixed_dictionaries({"userid": field_values()}), json_values),
            "text": st.one_of(st.fixed_dictionaries({"content": field_values()}), json_values),
            "stream": st.one_of(st.fixed_dictionaries({"id": field_values()}), json_values),
            "response_url": field_values(),
            "event": json_values,
        },
    )


def _utf8(frame: str | bytes) -> str | bytes:
    return frame.encode("utf-8", "replace").decode() if isinstance(frame, str) else frame


def _header_safe(value: str) -> bool:
    return (
        len(value) < 4000 and value == value.strip() and all(0x20 <= ord(c) <= 0x7E for c in value)
    )


def _crypto_inputs(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, str, bool]]:
    junk = st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
    )
    return st.tuples(inner, junk, st.booleans())


ROUTES = [
    "/api/v1/messages",
    "/api/v1/conversations/1/messages",
    "/api/v1/conversations/1/stream",
    "/widget/v1/sites/shop",
    "/widget/v1/events",
    "/widget/v1/messages",
    "/widget/v1/uploads",
    "/widget/v1/files/x.png",
    TG_PATH,
    "/wechat/plain",
    "/wechat/safe",
    "/wecom/staff",
    "/wecom/bot",
    "/healthz",
]
PARAMS = [
    "after",
    "before",
    "limit",
    "site",
    "token",
    "conversation_id",
    "last_event_id",
    "signature",
    "msg_signature",
    "timestamp",
    "nonce",
    "echostr",
    "encrypt_type",
]
HEADERS = [
    "X-Api-Key",
    "Authorization",
    "Last-Event-ID",
    "Origin",
    "X-Forwarded-For",
    "X-Widget-Token",
    "X-Telegram-Bot-Api-Secret-Token",
    "Content-Type",
    "Content-Length-Hint",
    "Accept",
]


def targets() -> list[Target]:
    api_keys = st.one_of(st.just(API_KEY), st.just(API_KEY), header_text)
    types = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"])
    widget_body = bodies(widget_fields())
    frame = st.one_of(
        widget_fields().map(lambda f: json.dumps({"type": "send", **f})),
        widget_fields().map(json.dumps),
        texts,
        nested.map(lambda s: s[:40_000]),
        st.binary(max_size=100),
        st.integers(33_000, 40_000).map(lambda n: '{"type":"send","text":"' + "x" * n + '"}'),
    )
    magic = st.sampled_from(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b""]
    )
    return [
        Target("api-json", st.tuples(bodies(api_fields()), types, api_keys), api_message),
        Target(
            "api-query",
            st.tuples(
                st.one_of(st.just("1"), query_values),
                st.dictionaries(st.sampled_from(["after", "before", "limit", "x"]), query_values),
                st.one_of(st.none(), header_text),
                st.booleans(),
            ),
            api_query,
        ),
        Target(
            "widget-post",
            st.tuples(widget_body, st.one_of(st.just("shop"), header_text), st.just(ORIGIN)),
            widget_post,
        ),
        Target(
            "widget-upload",
            st.tuples(
                st.tuples(magic, st.binary(max_size=300)).map(lambda t: t[0] + t[1]),
                # (What HTTP allows in a header: aiohttp's parser refuses the rest itself.)
                st.one_of(tokens.filter(_header_safe), header_text),
                st.sampled_from(["image/png", "image/jpeg", "text/html", ""]),
            ),
            widget_upload,
        ),
        Target(
            "widget-events",
            st.tuples(
                good_token,
                st.dictionaries(
                    st.sampled_from(["site", "token", "conversation_id", "after", "last_event_id"]),
                    st.one_of(st.just("1"), query_values),
                ),
            ).map(lambda t: {"site": "shop", "token": t[0], **t[1]}),
            widget_events,
        ),
        Target(
            "widget-socket",
            st.tuples(
                st.one_of(st.none(), st.none(), widget_body),
                # (A text frame is UTF-8: lone surrogates reach the server JSON-escaped.)
                st.lists(frame.map(_utf8), max_size=3),
            ),
            widget_frames,
        ),
        Target(
            "telegram",
            st.tuples(
                bodies(telegram_updates()),
                st.one_of(st.just(TG_SECRET), st.just(TG_SECRET), header_text),
            ),
            telegram_update,
        ),
        Target(
            "wechat-xml",
            st.tuples(
                wechat_xml(),
                st.dictionaries(st.sampled_from(["encrypt_type", "echostr", "x"]), query_values),
            ),
            wechat_plain,
        ),
        Target("wechat-safe", _crypto_inputs(wechat_xml()), wechat_safe),
        Target("wecom-app", _crypto_inputs(wechat_xml()), wecom_app),
        Target(
            "wecom-bot",
            _crypto_inputs(st.one_of(bodies(bot_payloads()), st.binary(max_size=100))),
            wecom_bot,
        ),
        Target(
            "headers-query",
            st.tuples(
                st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]),
                st.sampled_from(ROUTES),
                st.dictionaries(st.sampled_from(HEADERS), header_text, max_size=4),
                st.dictionaries(st.sampled_from(PARAMS), query_values, max_size=4),
            ),
            headers_anywhere,
        ),
    ]


def run_target(svc: FuzzedService, target: Target, cases: int, seed: int | None = None) -> None:
    """`cases` Hypothesis examples of one entry point, then the health check. Raises the
    first failure Hypothesis found (shrunk)."""

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=seed is not None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(data=target.strategy)
    def case(data: Any) -> None:
        target.case(svc, data)

    case()
    svc.assert_healthy()


@contextlib.contextmanager
def fuzzed_service(tmp: Path, db_url: str | None = None) -> Iterator[FuzzedService]:
    svc = FuzzedService(tmp, db_url).start()
    try:
        yield svc
    finally:
        svc.stop()
