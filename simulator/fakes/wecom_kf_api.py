"""A fake WeChat Customer Service (微信客服): the `kf/*` API and WeCom's side of the callback.

`FakeKfApi` is an aiohttp server with `cgi-bin/gettoken` and the calls swarmdesk makes:
`kf/sync_msg` (an opaque cursor, `limit`, `has_more`), `kf/send_msg` (2,048 bytes of UTF-8,
one delivery per msgid, a few messages per customer message within 48 hours: 95001, no API
messages while people have the session: 95018), `kf/send_msg_on_event` (a welcome_code used
once within 20 s), `kf/service_state/get|trans` (the documented transitions) and
`kf/customer/batchget`. Tests and bench make customers and servicers write (`customer_writes`,
`servicer_writes`, `enter_session`, `session_ends`), which queues the item for sync_msg;
`KfCallbackClient` then posts the encrypted `kf_msg_or_event` callback as WeCom does.
Failures are injected with `fail_sync` / `fail_send` (errcodes), `fail_sync_after` (a pull cut
after some pages) and `hold_sync` (a pull that hangs until released). Every call is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import xmltodict
from aiohttp import web
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto

from simulator.fakes.server import LocalServer
from simulator.fakes.wechat_api import MAX_BYTES, WINDOW_S, sha1_sign

QUOTA_PER_MESSAGE = 5
WELCOME_TTL_S = 20.0
# service_state -> the states trans may move it to
TRANSITIONS = {0: {1, 2, 3, 4}, 1: {1, 2, 3, 4}, 2: {2, 3, 4}, 3: {3, 4}, 4: {0, 1, 2, 3}}


@dataclass
class KfSent:
    api: str  # send_msg | on_event
    open_kfid: str
    to: str
    text: str
    msgid: str
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Session:
    state: int = 0
    servicer: str = ""
    last_wrote: float = float("-inf")
    quota: int = 0


class FakeKfApi(LocalServer):
    def __init__(self, corp_id: str, secret: str, *, token_ttl_s: float = 7200) -> None:
        self.corp_id = corp_id
        self.secret = secret
        self.token_ttl_s = token_ttl_s
        self.tokens: dict[str, float] = {}  # token -> expires at (time.time())
        self.items: dict[str, list[dict[str, Any]]] = defaultdict(list)  # open_kfid -> items
        self.sessions: dict[tuple[str, str], _Session] = defaultdict(_Session)
        self.sent: list[KfSent] = []
        self.msgids: dict[str, str] = {}  # our msgid -> the one answered (dedup)
        self.sync_requests: list[dict[str, Any]] = []
        self.trans: list[tuple[str, str, int, str]] = []  # (open_kfid, user, state, servicer)
        self.calls: Counter[str] = Counter()
        self.errors: list[tuple[str, int]] = []
        self.welcome_codes: dict[str, tuple[str, str, float]] = {}  # code -> kfid, user, until
        self.fail_sync: deque[int] = deque()
        # (pages still served, errcode): sync_msg fails with errcode after that many pages
        self.fail_sync_after: tuple[int, int] | None = None
        self.fail_send: deque[int] = deque()
        self.hold_sync: asyncio.Event | None = None  # set: pulls proceed
        self.first_send_at: dict[str, float] = {}  # user -> time.monotonic() of the first send
        self._ids = itertools.count(1)

    # -- what customers and servicers do ----------------------------------------------------

    def _item(self, kfid: str, user: str, origin: int, kind: str, body: dict[str, Any]) -> str:
        msgid = f"msg{next(self._ids)}{secrets.token_hex(4)}"
        item: dict[str, Any] = {
            "msgid": msgid,
            "open_kfid": kfid,
            "external_userid": user,
            "send_time": int(time.time()),
            "origin": origin,
            "msgtype": kind,
            kind: body,
        }
        if kind == "event":
            item.pop("external_userid")
        self.items[kfid].append(item)
        return msgid

    def customer_writes(
        self, kfid: str, user: str, text: str = "", kind: str = "text", **body: Any
    ) -> str:
        """A customer's message: 48 hours and a fresh quota of API messages open."""
        s = self.sessions[(kfid, user)]
        s.last_wrote, s.quota = time.time(), QUOTA_PER_MESSAGE
        if s.state == 4:
            s.state = 0  # an ended session starts again
        payload = {"content": text} if kind == "text" else body
        return self._item(kfid, user, 3, kind, payload)

    def servicer_writes(self, kfid: str, user: str, text: str, servicer: str = "zhangsan") -> str:
        item_id = self._item(kfid, user, 5, "text", {"content": text})
        self.items[kfid][-1]["servicer_userid"] = servicer
        return item_id

    def enter_session(self, kfid: str, user: str) -> str:
        code = "wc" + secrets.token_hex(8)
        self.welcome_codes[code] = (kfid, user, time.time() + WELCOME_TTL_S)
        event = {
            "event_type": "enter_session",
            "open_kfid": kfid,
            "external_userid": user,
            "scene": "123",
            "welcome_code": code,
        }
        return self._item(kfid, user, 4, "event", event)

    def servicer_takes(self, kfid: str, user: str, servicer: str = "zhangsan") -> str:
        """A servicer picks the session up in WeCom (from the pool or on their own)."""
        s = self.sessions[(kfid, user)]
        s.state, s.servicer = 3, servicer
        return self._session_event(kfid, user, 1, servicer)

    def session_ends(self, kfid: str, user: str) -> str:
        s = self.sessions[(kfid, user)]
        old, s.state, s.servicer = s.servicer, 4, ""
        return self._session_event(kfid, user, 3, "", old)

    def _session_event(self, kfid: str, user: str, change: int, new: str, old: str = "") -> str:
        event = {
            "event_type": "session_status_change",
            "open_kfid": kfid,
            "external_userid": user,
            "change_type": change,
            "old_servicer_userid": old,
            "new_servicer_userid": new,
        }
        return self._item(kfid, user, 4, "event", event)

    def send_fails(self, kfid: str, user: str, fail_msgid: str) -> str:
        """WeCom reports later that a message it took could not reach the customer."""
        event = {
            "event_type": "msg_send_fail",
            "open_kfid": kfid,
            "external_userid": user,
            "fail_msgid": fail_msgid,
            "fail_type": 4,  # the customer refuses messages
        }
        return self._item(kfid, user, 4, "event", event)

    def close_window(self, kfid: str, user: str) -> None:
        self.sessions[(kfid, user)].last_wrote = time.time() - WINDOW_S - 1

    def texts(self, user: str) -> list[str]:
        return [s.text for s in self.sent if s.to == user]

    def joined(self, user: str) -> str:
        return "".join(s.text for s in self.sent if s.to == user and s.api == "send_msg")

    # -- server ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cgi-bin/gettoken", self._gettoken)
        for path, handler in (
            ("sync_msg", self._sync_msg),
            ("send_msg", self._send_msg),
            ("send_msg_on_event", self._on_event),
            ("service_state/get", self._state_get),
            ("service_state/trans", self._state_trans),
            ("customer/batchget", self._batchget),
        ):
            app.router.add_post(f"/cgi-bin/kf/{path}", self._tokened(path, handler))
        return app

    async def stop(self) -> None:
        if self.hold_sync is not None:
            self.hold_sync.set()
        await super().stop()

    def _err(self, call: str, code: int, msg: str) -> web.Response:
        self.errors.append((call, code))
        return web.json_response({"errcode": code, "errmsg": msg})

    def expire_tokens(self) -> None:
        for t in self.tokens:
            self.tokens[t] = 0

    async def _gettoken(self, request: web.Request) -> web.Response:
        self.calls["gettoken"] += 1
        q = request.query
        if q.get("corpid") != self.corp_id or q.get("corpsecret") != self.secret:
            return self._err("gettoken", 40001, "invalid credential")
        value = f"kf-{next(self._ids)}-{secrets.token_hex(4)}"
        self.tokens[value] = time.time() + self.token_ttl_s
        return web.json_response(
            {"errcode": 0, "access_token": value, "expires_in": int(self.token_ttl_s)}
        )

    def _tokened(self, call: str, handler: Any) -> Any:
        async def route(request: web.Request) -> web.Response:
            self.calls[call] += 1
            expires = self.tokens.get(request.query.get("access_token", ""))
            if expires is None:
                return self._err(call, 40014, "invalid access_token")
            if expires <= time.time():
                return self._err(call, 42001, "access_token expired")
            try:
                body = json.loads(await request.read())
            except ValueError:
                return self._err(call, 47001, "data format error")
            result: web.Response = await handler(body)
            return result

        return route

    async def _sync_msg(self, body: dict[str, Any]) -> web.Response:
        self.sync_requests.append(dict(body))
        if self.hold_sync is not None:
            await self.hold_sync.wait()
        if self.fail_sync:
            return self._err("sync_msg", self.fail_sync.popleft(), "injected")
        if self.fail_sync_after is not None:
            left, code = self.fail_sync_after
            if left <= 0:
                return self._err("sync_msg", code, "injected")
            self.fail_sync_after = (left - 1, code)
        kfid = str(body.get("open_kfid", ""))
        cursor = str(body.get("cursor") or "")
        try:
            start = int(base64.urlsafe_b64decode(cursor.encode()).decode()) if cursor else 0
        except ValueError:
            return self._err("sync_msg", 95000, "invalid cursor")
        limit = max(1, min(int(body.get("limit") or 1000), 1000))
        items = self.items.get(kfid, [])
        page = items[start : start + limit]
        end = start + len(page)
        return web.json_response(
            {
                "errcode": 0,
                "errmsg": "ok",
                "next_cursor": base64.urlsafe_b64encode(str(end).encode()).decode(),
                "has_more": 1 if end < len(items) else 0,
                "msg_list": page,
            }
        )

    async def _send_msg(self, body: dict[str, Any]) -> web.Response:
        to, kfid = str(body.get("touser", "")), str(body.get("open_kfid", ""))
        msgid = str(body.get("msgid") or "")
        if msgid and msgid in self.msgids:
            return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": self.msgids[msgid]})
        if self.fail_send:
            return self._err("send_msg", self.fail_send.popleft(), "injected")
        text = str((body.get("text") or {}).get("content", ""))
        if body.get("msgtype") != "text" or not text:
            return self._err("send_msg", 40008, "invalid message type")
        if len(text.encode("utf-8")) > MAX_BYTES:
            return self._err("send_msg", 45002, "content size out of limit")
        s = self.sessions[(kfid, to)]
        if s.state not in (0, 1):
            return self._err("send_msg", 95018, "session state not allowed to send")
        if time.time() - s.last_wrote > WINDOW_S or s.quota <= 0:
            return self._err("send_msg", 95001, "send msg count limit")
        s.quota -= 1
        answer_id = msgid or f"kfsent{next(self._ids)}"
        self.msgids[answer_id] = answer_id
        self.sent.append(KfSent("send_msg", kfid, to, text, answer_id))
        self.first_send_at.setdefault(to, time.monotonic())
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": answer_id})

    async def _on_event(self, body: dict[str, Any]) -> web.Response:
        found = self.welcome_codes.pop(str(body.get("code", "")), None)
        if found is None or found[2] < time.time():
            return self._err("send_msg_on_event", 95010, "invalid or expired code")
        text = str((body.get("text") or {}).get("content", ""))
        msgid = f"kfwelcome{next(self._ids)}"
        self.sent.append(KfSent("on_event", found[0], found[1], text, msgid))
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": msgid})

    async def _state_get(self, body: dict[str, Any]) -> web.Response:
        s = self.sessions[(str(body.get("open_kfid")), str(body.get("external_userid")))]
        return web.json_response(
            {"errcode": 0, "errmsg": "ok", "service_state": s.state, "servicer_userid": s.servicer}
        )

    async def _state_trans(self, body: dict[str, Any]) -> web.Response:
        kfid, user = str(body.get("open_kfid")), str(body.get("external_userid"))
        s = self.sessions[(kfid, user)]
        state = int(body.get("service_state", -1))
        servicer = str(body.get("servicer_userid") or "")
        if state not in TRANSITIONS[s.state]:
            return self._err("service_state/trans", 95016, "state change not allowed")
        if state == 3 and not servicer:
            return self._err("service_state/trans", 95014, "servicer_userid required")
        s.state, s.servicer = state, servicer
        self.trans.append((kfid, user, state, servicer))
        return web.json_response({"errcode": 0, "errmsg": "ok", "msg_code": secrets.token_hex(4)})

    async def _batchget(self, body: dict[str, Any]) -> web.Response:
        users = [str(u) for u in body.get("external_userid_list") or []][:100]
        return web.json_response(
            {
                "errcode": 0,
                "errmsg": "ok",
                "customer_list": [
                    {
                        "external_userid": u,
                        "nickname": f"顾客{u[-4:]}",
                        "avatar": "",
                        "gender": 0,
                        "unionid": f"union-{u}",
                    }
                    for u in users
                ],
                "invalid_external_userid": [],
            }
        )


class KfCallbackClient:
    """Posts the `kf_msg_or_event` callback as WeCom does (encrypted, signed)."""

    def __init__(
        self, http: httpx.AsyncClient, path: str, token: str, aes_key: str, corp_id: str
    ) -> None:
        self.http = http
        self.path = path
        self.token = token
        self.corp_id = corp_id
        self.crypto = EnterpriseCrypto(token, aes_key, corp_id)

    def body(self, inner_xml: str) -> tuple[dict[str, str], bytes]:
        ts, nonce = str(int(time.time())), secrets.token_hex(5)
        wrapped = xmltodict.parse(self.crypto.encrypt_message(inner_xml, nonce, ts))
        enc = wrapped["xml"]["Encrypt"]
        body = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
        )
        params = {"msg_signature": sha1_sign(self.token, ts, nonce, enc), "timestamp": ts}
        params["nonce"] = nonce
        return params, body.encode("utf-8")

    def event_xml(self, open_kfid: str, sync_token: str = "") -> str:
        return (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[kf_msg_or_event]]></Event>"
            f"<Token><![CDATA[{sync_token or 'ENC' + secrets.token_hex(12)}]]></Token>"
            f"<OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
        )

    async def notify(self, open_kfid: str) -> httpx.Response:
        params, body = self.body(self.event_xml(open_kfid))
        return await self.http.post(self.path, params=params, content=body)
