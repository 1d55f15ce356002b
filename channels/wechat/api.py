"""Async clients of the WeChat (Official Account) and WeCom HTTP APIs, on httpx.

Every call carries the account's access_token; a token the platform calls expired or invalid
(40001/42001/40014) is refreshed once and the call retried once. Errors the caller must act
on (closed 48-hour window, quota, text too long) come out as `WechatApiError` with the
platform's errcode.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import structlog

from channels.wechat.tokens import AccessToken, TokenStore

log = structlog.get_logger(__name__)

# errcodes the code reacts to
OUT_OF_WINDOW = 45015  # the shopper has not written within 48 hours
TOO_LONG = 45002
QUOTA = 45047  # too many customer-service messages since the shopper last wrote
FREQUENCY = 45009  # API call frequency or per-member limit
BUSY = -1  # "system busy, try again"
OA_TOKEN_ERRORS = frozenset({40001, 40014, 42001})
WECOM_TOKEN_ERRORS = frozenset({40014, 42001})

_BUSY_RETRIES = (0.3, 1.0)
_CONNECT_RETRIES = (0.2, 0.6)


class WechatApiError(Exception):
    def __init__(self, errcode: int, errmsg: str, call: str) -> None:
        super().__init__(f"{call}: errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.call = call


class WechatTransportError(Exception):
    """The request may or may not have reached WeChat (timeout, dropped connection)."""


def _dumps(body: dict[str, Any]) -> bytes:
    # WeChat wants UTF-8 text, not \\u escapes.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _request(
    http: httpx.AsyncClient, method: str, url: str, call: str, **kwargs: Any
) -> dict[str, Any]:
    """One HTTP exchange; connection failures (nothing was sent) are retried."""
    for delay in (*_CONNECT_RETRIES, None):
        try:
            r = await http.request(method, url, **kwargs)
            break
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            if delay is None:
                raise WechatTransportError(f"{call}: cannot connect: {e!r}") from e
            await asyncio.sleep(delay)
        except httpx.HTTPError as e:
            raise WechatTransportError(f"{call}: {e!r}") from e
    if r.status_code != 200:
        raise WechatApiError(-2, f"HTTP {r.status_code}: {r.text[:200]}", call)
    try:
        data = r.json()
    except ValueError as e:
        raise WechatApiError(-3, f"not JSON: {r.text[:200]}", call) from e
    if not isinstance(data, dict):
        raise WechatApiError(-3, "not a JSON object", call)
    return data


def _errcode(data: dict[str, Any]) -> int:
    try:
        return int(data.get("errcode") or 0)
    except (TypeError, ValueError):
        return -3


class _TokenedApi:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        token: AccessToken,
        token_errors: frozenset[int],
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._token_errors = token_errors

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` with the access_token; errcode 0 or WechatApiError."""
        token = await self.token.get()
        data = await self._post(path, token, body)
        if _errcode(data) in self._token_errors:
            log.info("wechat_token_rejected", account=self.token.key, errcode=_errcode(data))
            token = await self.token.refresh(token)
            data = await self._post(path, token, body)
        for delay in _BUSY_RETRIES:
            if _errcode(data) != BUSY:
                break
            await asyncio.sleep(delay)
            data = await self._post(path, token, body)
        code = _errcode(data)
        if code != 0:
            raise WechatApiError(code, str(data.get("errmsg", "")), path)
        return data

    async def _post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        return await _request(
            self.http,
            "POST",
            f"{self.base_url}{path}",
            path,
            params={"access_token": token},
            content=_dumps(body),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )


class OfficialAccountApi(_TokenedApi):
    """The customer-service message API of one Official Account."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        account: str,
        appid: str,
        secret: str,
        store: TokenStore,
        stable_token: bool = True,
    ) -> None:
        self.appid = appid
        self._secret = secret
        self._stable = stable_token
        base = base_url.rstrip("/")
        token = AccessToken(f"wechat:{account}:{appid}", self._fetch_token, store)
        super().__init__(http, base, token, OA_TOKEN_ERRORS)

    async def _fetch_token(self, force: bool) -> tuple[str, float]:
        if self._stable:
            call = "/cgi-bin/stable_token"
            body = {
                "grant_type": "client_credential",
                "appid": self.appid,
                "secret": self._secret,
                "force_refresh": force,
            }
            data = await _request(
                self.http,
                "POST",
                self.base_url + call,
                call,
                content=_dumps(body),
                headers={"Content-Type": "application/json; charset=utf-8"},
            )
        else:
            call = "/cgi-bin/token"
            params = {
                "grant_type": "client_credential",
                "appid": self.appid,
                "secret": self._secret,
            }
            data = await _request(self.http, "GET", self.base_url + call, call, params=params)
        return _token_from(data, call, f"the AppID/AppSecret of {self.appid}")

    async def send_text(self, openid: str, text: str) -> str:
        data = await self.post(
            "/cgi-bin/message/custom/send",
            {"touser": openid, "msgtype": "text", "text": {"content": text}},
        )
        return str(data.get("msgid", ""))

    async def typing(self, openid: str, on: bool = True) -> None:
        await self.post(
            "/cgi-bin/message/custom/typing",
            {"touser": openid, "command": "Typing" if on else "CancelTyping"},
        )


class WecomApi(_TokenedApi):
    """`message/send` of one WeCom self-built application."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        account: str,
        corp_id: str,
        agent_id: int,
        secret: str,
        store: TokenStore,
    ) -> None:
        self.corp_id = corp_id
        self.agent_id = agent_id
        self._secret = secret
        token = AccessToken(f"wecom:{account}:{corp_id}:{agent_id}", self._fetch_token, store)
        super().__init__(http, base_url, token, WECOM_TOKEN_ERRORS)

    async def _fetch_token(self, force: bool) -> tuple[str, float]:
        call = "/cgi-bin/gettoken"
        params = {"corpid": self.corp_id, "corpsecret": self._secret}
        data = await _request(self.http, "GET", self.base_url + call, call, params=params)
        return _token_from(data, call, f"the corp id and Secret of agent {self.agent_id}")

    async def send_text(self, user_id: str, text: str) -> str:
        data = await self.post(
            "/cgi-bin/message/send",
            {
                "touser": user_id,
                "msgtype": "text",
                "agentid": self.agent_id,
                "text": {"content": text},
                "safe": 0,
            },
        )
        if data.get("invaliduser"):
            raise WechatApiError(81013, f"not a member of the app: {data['invaliduser']}", "send")
        return str(data.get("msgid", ""))


def _token_from(data: dict[str, Any], call: str, what: str) -> tuple[str, float]:
    code = _errcode(data)
    token = data.get("access_token")
    if code != 0 or not isinstance(token, str) or not token:
        msg = str(data.get("errmsg", "no access_token in the answer"))
        log.error("wechat_token_failed", call=call, errcode=code, errmsg=msg, check=what)
        raise WechatApiError(code or -3, f"{msg} (check {what} and the IP allowlist)", call)
    try:
        expires_in = float(data.get("expires_in", 7200))
    except (TypeError, ValueError):
        expires_in = 7200.0
    return token, max(expires_in, 1.0)


async def post_response_url(http: httpx.AsyncClient, url: str, text: str) -> None:
    """A WeCom bot's one-time `response_url` (valid one hour): a markdown message."""
    data = await _request(
        http,
        "POST",
        url,
        "response_url",
        content=_dumps({"msgtype": "markdown", "markdown": {"content": text}}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    code = _errcode(data)
    if code != 0:
        raise WechatApiError(code, str(data.get("errmsg", "")), "response_url")
