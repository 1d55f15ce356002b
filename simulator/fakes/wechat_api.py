"""A fake WeChat: the HTTP APIs swarmdesk calls, and WeChat's side of the callbacks.

`FakeWechatApi` is an aiohttp server with the Official Account and WeCom endpoints swarmdesk
uses — `cgi-bin/token`, `cgi-bin/stable_token`, `message/custom/send`, `message/custom/typing`,
`cgi-bin/gettoken`, `message/send` — and a `response_url` endpoint for WeCom bots. It
enforces the rules that shape the channel: 2,048 bytes of UTF-8 per text (45002), the
48-hour window (45015: only users who wrote may be messaged), a quota of customer-service
messages per shopper message (45047), WeCom's messages per member per minute (45009), and
access tokens that expire (42001) or are unknown (40001 / 40014). Every delivery is recorded.

`OfficialAccountClient`, `WecomAppClient` and `WecomBotClient` post callbacks the way WeChat
does: signed (SHA-1 over the sorted token, timestamp, nonce [, ciphertext]), in plaintext or
AES (wechatpy's crypto, the documented format), and read the passive replies back.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import httpx
import xmltodict
from aiohttp import web
from wechatpy.crypto import WeChatCrypto
from wechatpy.enterprise.crypto import PrpCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto

from simulator.fakes.server import LocalServer

MAX_BYTES = 2048
WINDOW_S = 48 * 3600

# The sample from WeChat's message-encryption documentation (also WeCom's): Token, key,
# receiver id, and one encrypted message with its signature.
DOC_TOKEN = "QDG6eK"
DOC_AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
DOC_APPID = "wx5823bf96d3bd56c7"
DOC_MSG_SIGNATURE = "477715d11cdb4164915debcba66cb864d751f3e6"
DOC_TIMESTAMP = "1409659813"
DOC_NONCE = "1372623149"
DOC_ENCRYPT = (
    "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj9"
    "11L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06D"
    "OdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH"
    "03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6"
    "BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN"
    "+E7Q=="
)
DOC_BODY = (
    f"<xml><ToUserName><![CDATA[{DOC_APPID}]]></ToUserName>"
    f"<Encrypt><![CDATA[{DOC_ENCRYPT}]]></Encrypt>"
    "<AgentID><![CDATA[218]]></AgentID></xml>"
)
# What it decrypts to: "hello" from user "mycreate", MsgId 4561255354251345929, agent 218.
DOC_FROM = "mycreate"
DOC_CONTENT = "hello"
DOC_MSG_ID = "4561255354251345929"
# URL verification sample of the same documentation.
DOC_VERIFY_SIGNATURE = "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3"
DOC_VERIFY_TIMESTAMP = "1409659589"
DOC_VERIFY_NONCE = "263014780"
DOC_VERIFY_ECHOSTR = (
    "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="
)
DOC_VERIFY_PLAIN = "1616140317555161061"


def sha1_sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


@dataclass
class Sent:
    api: str  # custom (Official Account), wecom (message/send), response_url
    account: str  # appid, corpid:agentid, or the response_url key
    to: str
    text: str
    at: float = field(default_factory=time.monotonic)
    msgid: str = ""


@dataclass
class _Token:
    owner: str
    expires_at: float


class FakeWechatApi(LocalServer):
    def __init__(
        self,
        *,
        token_ttl_s: float = 7200,
        quota_per_message: int = 20,
        wecom_per_member_per_minute: int = 30,
    ) -> None:
        self.token_ttl_s = token_ttl_s
        self.quota_per_message = quota_per_message
        self.wecom_per_minute = wecom_per_member_per_minute
        self.secrets: dict[str, str] = {}  # appid or corpid -> secret
        self.tokens: dict[str, _Token] = {}
        self.current: dict[str, str] = {}  # owner -> the token stable_token hands out
        self.token_requests: list[tuple[str, str]] = []  # (endpoint, owner)
        self.sent: list[Sent] = []
        self.typing: list[tuple[str, str]] = []  # (openid, command)
        self.first_typing: dict[str, float] = {}  # openid -> time.monotonic() of the first
        self.errors: list[tuple[str, int]] = []  # (call, errcode) answered
        self.last_wrote: dict[str, float] = {}  # openid -> time the shopper last wrote
        self.quota_left: dict[str, int] = {}
        self.fail_next: deque[int] = deque()  # errcodes for the next sends
        self._wecom_sends: dict[str, deque[float]] = defaultdict(deque)
        self._ids = itertools.count(1)

    # -- control -----------------------------------------------------------------------------

    def add_official_account(self, appid: str, secret: str) -> None:
        self.secrets[appid] = secret

    def add_corp_app(self, corp_id: str, secret: str) -> None:
        self.secrets[corp_id] = secret

    def user_wrote(self, openid: str) -> None:
        """The shopper sent a message: the 48-hour window opens and the quota resets."""
        self.last_wrote[openid] = time.time()
        self.quota_left[openid] = self.quota_per_message

    def close_window(self, openid: str) -> None:
        self.last_wrote[openid] = time.time() - WINDOW_S - 1

    def expire_tokens(self) -> None:
        """Every token issued so far expires now (as if two hours had passed)."""
        for t in self.tokens.values():
            t.expires_at = 0

    def texts(self, to: str, api: str | None = None) -> list[str]:
        return [s.text for s in self.sent if s.to == to and (api is None or s.api == api)]

    def joined(self, to: str, api: str | None = None) -> str:
        return "".join(self.texts(to, api))

    # -- server ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cgi-bin/token", self._token)
        app.router.add_post("/cgi-bin/stable_token", self._stable_token)
        app.router.add_get("/cgi-bin/gettoken", self._gettoken)
        app.router.add_post("/cgi-bin/message/custom/send", self._custom_send)
        app.router.add_post("/cgi-bin/message/custom/typing", self._typing)
        app.router.add_post("/cgi-bin/message/send", self._wecom_send)
        app.router.add_post("/response_url/{key}", self._response_url)
        app.router.add_get("/_fake/sent", self._dump)
        return app

    def response_url(self, key: str | None = None) -> str:
        return f"{self.base_url}/response_url/{key or secrets.token_hex(6)}"

    # -- tokens ------------------------------------------------------------------------------

    def _issue(self, owner: str) -> dict[str, Any]:
        value = f"tok-{owner}-{next(self._ids)}-{secrets.token_hex(4)}"
        self.tokens[value] = _Token(owner, time.time() + self.token_ttl_s)
        self.current[owner] = value
        return {"access_token": value, "expires_in": int(self.token_ttl_s)}

    def _err(self, call: str, code: int, msg: str) -> web.Response:
        self.errors.append((call, code))
        return web.json_response({"errcode": code, "errmsg": msg})

    async def _token(self, request: web.Request) -> web.Response:
        q = request.query
        appid = q.get("appid", "")
        self.token_requests.append(("token", appid))
        if q.get("grant_type") != "client_credential":
            return self._err("token", 40002, "invalid grant_type")
        if self.secrets.get(appid) != q.get("secret"):
            return self._err("token", 40125, "invalid appsecret")
        old = self.current.get(appid)
        if old:
            self.tokens.pop(old, None)  # a classic token replaces the previous one
        return web.json_response(self._issue(appid))

    async def _stable_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        appid = str(body.get("appid", ""))
        self.token_requests.append(("stable_token", appid))
        if body.get("grant_type") != "client_credential":
            return self._err("stable_token", 40002, "invalid grant_type")
        if self.secrets.get(appid) != body.get("secret"):
            return self._err("stable_token", 40125, "invalid appsecret")
        cur = self.current.get(appid)
        token = self.tokens.get(cur) if cur else None
        if token is not None and token.expires_at > time.time() and not body.get("force_refresh"):
            left = int(token.expires_at - time.time())
            return web.json_response({"access_token": cur, "expires_in": left})
        return web.json_response(self._issue(appid))

    async def _gettoken(self, request: web.Request) -> web.Response:
        corp = request.query.get("corpid", "")
        self.token_requests.append(("gettoken", corp))
        if self.secrets.get(corp) != request.query.get("corpsecret"):
            return self._err("gettoken", 40001, "invalid credential")
        cur = self.current.get(corp)
        token = self.tokens.get(cur) if cur else None
        if token is not None and token.expires_at > time.time():
            left = int(token.expires_at - time.time())
            return web.json_response({"errcode": 0, "access_token": cur, "expires_in": left})
        return web.json_response({"errcode": 0, "errmsg": "ok", **self._issue(corp)})

    def _check_token(self, request: web.Request, call: str, wecom: bool) -> web.Response | str:
        token = self.tokens.get(request.query.get("access_token", ""))
        if token is None:
            return self._err(call, 40014 if wecom else 40001, "invalid access_token")
        if token.expires_at <= time.time():
            return self._err(call, 42001, "access_token expired")
        return token.owner

    # -- Official Account --------------------------------------------------------------------

    async def _custom_send(self, request: web.Request) -> web.Response:
        owner = self._check_token(request, "custom_send", wecom=False)
        if isinstance(owner, web.Response):
            return owner
        body = json.loads(await request.read())
        to = str(body.get("touser", ""))
        if self.fail_next:
            return self._err("custom_send", self.fail_next.popleft(), "injected")
        if body.get("msgtype") != "text":
            return self._err("custom_send", 40008, "invalid message type")
        text = str((body.get("text") or {}).get("content", ""))
        if not text:
            return self._err("custom_send", 44004, "empty content")
        if len(text.encode("utf-8")) > MAX_BYTES:
            return self._err("custom_send", 45002, "content size out of limit")
        if time.time() - self.last_wrote.get(to, float("-inf")) > WINDOW_S:
            return self._err("custom_send", 45015, "response out of time limit")
        if self.quota_left.get(to, 0) <= 0:
            return self._err("custom_send", 45047, "out of response count limit")
        self.quota_left[to] -= 1
        msgid = str(next(self._ids))
        self.sent.append(Sent("custom", owner, to, text, msgid=msgid))
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": msgid})

    async def _typing(self, request: web.Request) -> web.Response:
        owner = self._check_token(request, "typing", wecom=False)
        if isinstance(owner, web.Response):
            return owner
        body = json.loads(await request.read())
        to = str(body.get("touser", ""))
        if time.time() - self.last_wrote.get(to, float("-inf")) > WINDOW_S:
            return self._err("typing", 45015, "response out of time limit")
        self.typing.append((to, str(body.get("command"))))
        self.first_typing.setdefault(to, time.monotonic())
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    # -- WeCom -------------------------------------------------------------------------------

    async def _wecom_send(self, request: web.Request) -> web.Response:
        owner = self._check_token(request, "message_send", wecom=True)
        if isinstance(owner, web.Response):
            return owner
        body = json.loads(await request.read())
        to = str(body.get("touser", ""))
        if self.fail_next:
            return self._err("message_send", self.fail_next.popleft(), "injected")
        text = str((body.get("text") or {}).get("content", ""))
        if body.get("msgtype") != "text" or not text:
            return self._err("message_send", 40008, "invalid message")
        if len(text.encode("utf-8")) > MAX_BYTES:
            return self._err("message_send", 45002, "content size out of limit")
        recent = self._wecom_sends[to]
        now = time.monotonic()
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= self.wecom_per_minute:
            return self._err("message_send", 45009, "reach max api minute quota per member")
        recent.append(now)
        msgid = f"wecom-{next(self._ids)}"
        self.sent.append(Sent("wecom", f"{owner}:{body.get('agentid')}", to, text, msgid=msgid))
        return web.json_response({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": msgid})

    async def _response_url(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if any(s.api == "response_url" and s.account == key for s in self.sent):
            return self._err("response_url", 40099, "response_url already used")
        body = json.loads(await request.read())
        text = str((body.get(body.get("msgtype", "")) or {}).get("content", ""))
        self.sent.append(Sent("response_url", key, key, text))
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _dump(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "sent": [s.__dict__ for s in self.sent],
                "errors": self.errors,
                "typing": self.typing,
                "token_requests": self.token_requests,
            }
        )


# --- WeChat's side of the callbacks ---------------------------------------------------------


def text_xml(openid: str, text: str, msg_id: str | int, *, to: str = "gh_shop") -> str:
    return (
        f"<xml><ToUserName><![CDATA[{to}]]></ToUserName>"
        f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{text}]]></Content><MsgId>{msg_id}</MsgId></xml>"
    )


def message_xml(openid: str, fields: dict[str, str | int], *, to: str = "gh_shop") -> str:
    """Any message or event: `fields` are its elements after From/To/CreateTime."""
    body = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields.items())
    return (
        f"<xml><ToUserName><![CDATA[{to}]]></ToUserName>"
        f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime>{body}</xml>"
    )


class OfficialAccountClient:
    """Posts to an Official Account callback as WeChat's server does."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        path: str,
        token: str,
        *,
        appid: str = "wx_test_app",
        aes_key: str | None = None,
        api: FakeWechatApi | None = None,
    ) -> None:
        self.http = http
        self.path = path
        self.token = token
        self.appid = appid
        self.crypto = WeChatCrypto(token, aes_key, appid) if aes_key else None
        self.api = api
        self._ids = itertools.count(int(time.time() * 1000) * 1000)

    def msg_id(self) -> str:
        return str(next(self._ids))

    def params(self, openid: str = "") -> dict[str, str]:
        ts, nonce = str(int(time.time())), secrets.token_hex(5)
        p = {"signature": sha1_sign(self.token, ts, nonce), "timestamp": ts, "nonce": nonce}
        if openid:
            p["openid"] = openid
        return p

    async def verify(self, echostr: str, **override: str) -> httpx.Response:
        p = {**self.params(), "echostr": echostr, **override}
        return await self.http.get(self.path, params=p)

    async def post_xml(
        self,
        xml: str,
        *,
        encrypt: bool = False,
        timeout: float = 5.0,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        p = self.params()
        body = xml
        if encrypt:
            assert self.crypto is not None
            wrapped = xmltodict.parse(self.crypto.encrypt_message(xml, p["nonce"], p["timestamp"]))
            enc = wrapped["xml"]["Encrypt"]
            body = (
                f"<xml><ToUserName><![CDATA[gh_shop]]></ToUserName>"
                f"<Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
            )
            p["encrypt_type"] = "aes"
            p["msg_signature"] = sha1_sign(self.token, p["timestamp"], p["nonce"], enc)
        if params:
            p.update(params)
        return await self.http.post(
            self.path,
            params=p,
            content=body.encode("utf-8"),
            headers={"Content-Type": "text/xml"},
            timeout=timeout,
        )

    async def send_text(
        self,
        openid: str,
        text: str,
        msg_id: str | None = None,
        *,
        encrypt: bool = False,
        timeout: float = 5.0,
    ) -> httpx.Response:
        """The shopper writes: the window opens on the fake API, the callback is posted."""
        if self.api is not None:
            self.api.user_wrote(openid)
        return await self.post_xml(
            text_xml(openid, text, msg_id or self.msg_id()), encrypt=encrypt, timeout=timeout
        )

    def reply(self, r: httpx.Response) -> dict[str, Any] | None:
        """The passive reply as a dict (decrypted), or None for `success` / empty."""
        body = r.text.strip()
        if body in ("", "success"):
            return None
        doc: dict[str, Any] = xmltodict.parse(body)["xml"]
        if "Encrypt" in doc:
            assert self.crypto is not None
            sig = sha1_sign(self.token, doc["TimeStamp"], doc["Nonce"], doc["Encrypt"])
            assert sig == doc["MsgSignature"], "the reply's MsgSignature does not match"
            inner = self.crypto.decrypt_message(body, sig, doc["TimeStamp"], doc["Nonce"])
            doc = xmltodict.parse(inner)["xml"]
        return doc

    def reply_text(self, r: httpx.Response) -> str | None:
        doc = self.reply(r)
        return None if doc is None else str(doc.get("Content") or "")


class WecomAppClient:
    """Posts to a WeCom application callback (always encrypted)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        path: str,
        token: str,
        aes_key: str,
        corp_id: str,
        agent_id: int,
    ) -> None:
        self.http = http
        self.path = path
        self.token = token
        self.corp_id = corp_id
        self.agent_id = agent_id
        self.crypto = EnterpriseCrypto(token, aes_key, corp_id)
        self._ids = itertools.count(int(time.time() * 1000) * 1000)

    async def post_encrypted(self, inner_xml: str) -> httpx.Response:
        ts, nonce = str(int(time.time())), secrets.token_hex(5)
        wrapped = xmltodict.parse(self.crypto.encrypt_message(inner_xml, nonce, ts))
        enc = wrapped["xml"]["Encrypt"]
        body = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<AgentID><![CDATA[{self.agent_id}]]></AgentID>"
            f"<Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
        )
        params = {"msg_signature": sha1_sign(self.token, ts, nonce, enc), "timestamp": ts}
        params["nonce"] = nonce
        return await self.http.post(self.path, params=params, content=body.encode("utf-8"))

    async def send_text(self, user: str, text: str) -> httpx.Response:
        xml = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{text}]]></Content><MsgId>{next(self._ids)}</MsgId>"
            f"<AgentID>{self.agent_id}</AgentID></xml>"
        )
        return await self.post_encrypted(xml)


class WecomBotClient:
    """Posts to a WeCom intelligent-bot callback (encrypted JSON) and polls streams."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        path: str,
        token: str,
        aes_key: str,
        api: FakeWechatApi | None = None,
    ) -> None:
        self.http = http
        self.path = path
        self.token = token
        self.crypto = EnterpriseCrypto(token, aes_key, "")
        self.api = api
        self._ids = itertools.count(int(time.time() * 1000) * 1000)

    async def post(self, payload: dict[str, Any]) -> httpx.Response:
        ts, nonce = str(int(time.time())), secrets.token_hex(5)
        plain = json.dumps(payload, ensure_ascii=False)
        enc = PrpCrypto(self.crypto.key).encrypt(plain, "").decode()
        params = {"msg_signature": sha1_sign(self.token, ts, nonce, enc), "timestamp": ts}
        params["nonce"] = nonce
        return await self.http.post(self.path, params=params, json={"encrypt": enc})

    def decode(self, r: httpx.Response) -> dict[str, Any] | None:
        """The decrypted reply, None for an empty body."""
        if not r.text.strip():
            return None
        body = r.json()
        sig = sha1_sign(self.token, str(body["timestamp"]), body["nonce"], body["encrypt"])
        assert sig == body["msgsignature"], "the reply's msgsignature does not match"
        plain = self.crypto.decrypt_message(
            {"Encrypt": body["encrypt"]}, sig, str(body["timestamp"]), body["nonce"]
        )
        result: dict[str, Any] = json.loads(plain)
        return result

    def text_payload(
        self, user: str, text: str, *, msgid: str | None = None, chat: str | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "msgid": msgid or str(next(self._ids)),
            "aibotid": "AIBOT",
            "chattype": "group" if chat else "single",
            "from": {"userid": user},
            "msgtype": "text",
            "text": {"content": text},
        }
        if chat:
            payload["chatid"] = chat
        if self.api is not None:
            payload["response_url"] = self.api.response_url()
        return payload

    async def send_text(self, user: str, text: str, **kw: Any) -> dict[str, Any] | None:
        return self.decode(await self.post(self.text_payload(user, text, **kw)))

    async def poll(self, stream_id: str, user: str = "u") -> dict[str, Any] | None:
        return self.decode(
            await self.post(
                {
                    "msgid": str(next(self._ids)),
                    "aibotid": "AIBOT",
                    "chattype": "single",
                    "from": {"userid": user},
                    "msgtype": "stream",
                    "stream": {"id": stream_id},
                }
            )
        )

    async def poll_until_finished(
        self, stream_id: str, *, every: float = 0.1, timeout: float = 20
    ) -> tuple[dict[str, Any], list[str]]:
        """Poll like WeCom until `finish`; (the last stream, every content seen)."""
        seen: list[str] = []
        end = asyncio.get_running_loop().time() + timeout
        while True:
            reply = await self.poll(stream_id)
            assert reply is not None and reply["msgtype"] == "stream"
            stream: dict[str, Any] = reply["stream"]
            seen.append(stream["content"])
            if stream["finish"]:
                return stream, seen
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"stream {stream_id} not finished in {timeout}s")
            await asyncio.sleep(every)


def main() -> None:  # pragma: no cover - for manual runs
    p = argparse.ArgumentParser(description="fake WeChat API server")
    p.add_argument("--port", type=int, default=8092)
    args = p.parse_args()

    async def serve() -> None:
        api = FakeWechatApi()
        print(await api.start(args.port), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
