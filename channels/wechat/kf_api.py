"""The WeChat Customer Service (微信客服) API of one WeCom corp, on httpx.

wechatpy 1.8 has no `kf/*` calls and its clients block (requests), so these go through the
same token-refreshing `_TokenedApi` as the other WeChat APIs: the access token of corp id +
微信客服 Secret, fetched one at a time and renewed before it expires; a token WeCom calls
expired or invalid is renewed once and the call retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from channels.wechat.api import OA_TOKEN_ERRORS, _request, _token_from, _TokenedApi
from channels.wechat.tokens import AccessToken, TokenStore

# errcodes of kf/* the channel reacts to
KF_QUOTA = 95001  # no more messages until the customer writes again (5 per message, 48 h)
KF_STATE = 95018  # the session's state does not allow API messages (a servicer has it...)
KF_BAD_SYNC_TOKEN = 95007  # the callback's sync token expired (10 min): pull without it

# service_state values
STATE_NEW = 0  # 未处理
STATE_BOT = 1  # 由智能助手接待
STATE_POOL = 2  # 待接入池排队中
STATE_SERVICER = 3  # 由人工接待
STATE_ENDED = 4  # 已结束/未开始

SYNC_LIMIT = 1000  # messages per sync_msg page (the API's maximum)


@dataclass(frozen=True, slots=True)
class SyncPage:
    messages: list[dict[str, Any]]
    next_cursor: str
    has_more: bool


class KfApi(_TokenedApi):
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        corp_id: str,
        secret: str,
        store: TokenStore,
    ) -> None:
        self.corp_id = corp_id
        self._secret = secret
        self.calls = 0  # every kf/* and gettoken request (bench: API calls per answer)
        # WeCom answers 40014/42001 for bad tokens; 40001 too, after a Secret was reset.
        token = AccessToken(f"wecom_kf:{corp_id}", self._fetch_token, store)
        super().__init__(http, base_url, token, OA_TOKEN_ERRORS)

    async def _fetch_token(self, force: bool) -> tuple[str, float]:
        call = "/cgi-bin/gettoken"
        params = {"corpid": self.corp_id, "corpsecret": self._secret}
        self.calls += 1
        data = await _request(self.http, "GET", self.base_url + call, call, params=params)
        return _token_from(data, call, "the corp id and the 微信客服 Secret")

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return await super().post(path, body)

    async def sync_msg(
        self, open_kfid: str, cursor: str | None, token: str | None, limit: int = SYNC_LIMIT
    ) -> SyncPage:
        body: dict[str, Any] = {"open_kfid": open_kfid, "limit": limit, "voice_format": 0}
        if cursor:
            body["cursor"] = cursor
        if token:
            body["token"] = token  # from the callback: a higher rate limit for 10 minutes
        data = await self.post("/cgi-bin/kf/sync_msg", body)
        msgs = data.get("msg_list")
        return SyncPage(
            [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else [],
            str(data.get("next_cursor") or cursor or ""),
            bool(data.get("has_more")),
        )

    async def send_text(self, open_kfid: str, to: str, text: str, msgid: str | None) -> str:
        body: dict[str, Any] = {
            "touser": to,
            "open_kfid": open_kfid,
            "msgtype": "text",
            "text": {"content": text},
        }
        if msgid:
            body["msgid"] = msgid  # WeCom delivers one message per msgid: retries are safe
        data = await self.post("/cgi-bin/kf/send_msg", body)
        return str(data.get("msgid") or msgid or "")

    async def send_on_event(self, code: str, text: str) -> str:
        data = await self.post(
            "/cgi-bin/kf/send_msg_on_event",
            {"code": code, "msgtype": "text", "text": {"content": text}},
        )
        return str(data.get("msgid") or "")

    async def service_state(self, open_kfid: str, user: str) -> tuple[int, str]:
        """(service_state, servicer userid) of a customer's session."""
        data = await self.post(
            "/cgi-bin/kf/service_state/get", {"open_kfid": open_kfid, "external_userid": user}
        )
        return int(data.get("service_state") or 0), str(data.get("servicer_userid") or "")

    async def transfer(self, open_kfid: str, user: str, state: int, servicer: str = "") -> None:
        body: dict[str, Any] = {
            "open_kfid": open_kfid,
            "external_userid": user,
            "service_state": state,
        }
        if servicer:
            body["servicer_userid"] = servicer
        await self.post("/cgi-bin/kf/service_state/trans", body)

    async def customers(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """Profiles (nickname, avatar, unionid where granted) by external userid."""
        data = await self.post(
            "/cgi-bin/kf/customer/batchget",
            {"external_userid_list": users, "need_enter_session_context": 0},
        )
        found = data.get("customer_list")
        if not isinstance(found, list):
            return {}
        return {
            str(c["external_userid"]): c
            for c in found
            if isinstance(c, dict) and c.get("external_userid")
        }
