"""The `channels.wechat` section of swarmdesk.yaml: Official Accounts, WeCom apps and bots.

Secrets (AppSecret, corp secret, EncodingAESKey) never live in the file: each account names
the environment variable that holds them. The callback token may be written here or read
from a variable (`token_env`).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection

OA_API = "https://api.weixin.qq.com"
WECOM_API = "https://qyapi.weixin.qq.com"

MEDIA_TEXT = "收到啦！我暂时还看不了图片、语音和视频，请用文字描述您的问题，我马上为您解答。"

_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]*$")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _check_path(v: str) -> str:
    if not _PATH_RE.match(v) or "//" in v:
        raise ValueError(f"'{v}' is not a URL path; write it like /wechat/myshop")
    return v.rstrip("/") or "/"


def _check_url(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v.rstrip("/")


class _Callback(ConfigSection):
    name: str = Field(pattern=_NAME_RE, description="account name, stored on conversations")
    path: str = Field(description="callback URL path registered on the WeChat side")
    token: str | None = Field(None, description="the callback Token (or name it with token_env)")
    token_env: str | None = Field(None, description="environment variable holding the Token")
    aes_key_env: str | None = Field(
        None, description="environment variable holding the 43-character EncodingAESKey"
    )

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str) -> str:
        return _check_path(v)

    @model_validator(mode="after")
    def _one_token(self) -> _Callback:
        if not self.token and not self.token_env:
            raise ValueError(f"account '{self.name}': set token (or token_env)")
        return self

    def resolve_token(self) -> str:
        if self.token_env:
            value = os.environ.get(self.token_env)
            if not value:
                raise RuntimeError(
                    f"set {self.token_env}: it holds the callback Token of WeChat account "
                    f"'{self.name}'"
                )
            return value
        assert self.token is not None
        return self.token

    def resolve_aes_key(self, required: bool) -> str | None:
        if not self.aes_key_env:
            if required:
                raise RuntimeError(
                    f"account '{self.name}': set aes_key_env to the variable holding the "
                    "EncodingAESKey (this kind of callback is always encrypted)"
                )
            return None
        value = os.environ.get(self.aes_key_env)
        if not value:
            raise RuntimeError(
                f"set {self.aes_key_env}: it holds the EncodingAESKey of WeChat account "
                f"'{self.name}' (43 characters, from the platform's callback settings)"
            )
        if not re.fullmatch(r"[A-Za-z0-9+/]{43}", value):
            raise RuntimeError(
                f"{self.aes_key_env} must be the 43-character EncodingAESKey of account "
                f"'{self.name}' (letters and digits, as the platform shows it)"
            )
        return value


def _secret(env: str, what: str) -> str:
    value = os.environ.get(env)
    if not value:
        raise RuntimeError(f"set {env}: it holds the {what}")
    return value


class OfficialAccountSettings(_Callback):
    """One WeChat Official Account (公众号), served at its own callback path."""

    appid: str = Field(min_length=1)
    secret_env: str = Field(description="environment variable holding the AppSecret")
    encryption: Literal["auto", "plain", "compatible", "safe"] = Field(
        "auto",
        description="message encryption mode set on the WeChat side (safe recommended: "
        "plain and compatible bodies are unsigned); auto: safe when aes_key_env is set, "
        "plain otherwise",
    )
    passive_budget_seconds: float = Field(
        4.0,
        gt=0,
        le=4.8,
        description="answers ready within this many seconds are sent as the passive reply; "
        "later ones through the customer-service API (WeChat gives up after 5 s)",
    )
    welcome_text: str = Field("", description="sent to a new follower (empty: nothing)")
    media_text: str = Field(
        MEDIA_TEXT,
        description="answer to images, videos and voice without speech recognition "
        "(empty: store them silently)",
    )
    menu: dict[str, str] = Field(
        default_factory=dict,
        description="menu CLICK EventKey -> the question it asks (unlisted keys are stored only)",
    )
    typing: bool = Field(True, description="show 'typing' while a slow answer is written")
    token_endpoint: Literal["stable_token", "token"] = "stable_token"
    api_base_url: str | None = Field(None, description="default: channels.wechat.api_base_url")

    @field_validator("api_base_url")
    @classmethod
    def _url_ok(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v)

    def resolve_secret(self) -> str:
        return _secret(self.secret_env, f"AppSecret of official account '{self.name}'")

    def mode(self) -> Literal["plain", "compatible", "safe"]:
        if self.encryption == "auto":
            return "safe" if self.aes_key_env else "plain"
        return self.encryption

    @model_validator(mode="after")
    def _aes_for_mode(self) -> OfficialAccountSettings:
        if self.encryption in ("compatible", "safe") and not self.aes_key_env:
            raise ValueError(
                f"account '{self.name}': encryption '{self.encryption}' needs aes_key_env"
            )
        return self


class WecomAppSettings(_Callback):
    """A WeCom self-built application (自建应用): encrypted XML callbacks, message/send."""

    corp_id: str = Field(min_length=1)
    agent_id: int
    secret_env: str = Field(description="environment variable holding the application Secret")
    welcome_text: str = Field("", description="sent when a member subscribes (empty: nothing)")
    media_text: str = Field(MEDIA_TEXT, description="answer to images, files, voice, video")
    per_member_per_minute: int = Field(
        30, ge=1, description="WeCom accepts at most 30 messages a minute per member"
    )
    api_base_url: str | None = Field(
        None, description="default: channels.wechat.wecom_api_base_url"
    )

    @field_validator("api_base_url")
    @classmethod
    def _url_ok(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v)

    def resolve_secret(self) -> str:
        return _secret(self.secret_env, f"Secret of WeCom application '{self.name}'")


class WecomBotSettings(_Callback):
    """A WeCom intelligent bot (智能机器人) in API mode: encrypted JSON, `stream` replies."""

    welcome_text: str = Field("", description="reply when a member opens the chat")
    media_text: str = Field(MEDIA_TEXT, description="answer to images and files")
    passive_budget_seconds: float = Field(
        1.0,
        ge=0,
        le=4.5,
        description="how long the first callback waits for text before answering with an "
        "open stream (WeCom then polls the stream)",
    )
    stream_ttl_seconds: float = Field(
        330.0,
        gt=0,
        le=355,
        description="WeCom stops polling a stream 6 minutes after the message; an answer "
        "still unfinished by then is closed with holding_text and sent via response_url",
    )
    holding_text: str = "答案还在准备中，稍后发给您。"


class WechatSettings(ConfigSection):
    enabled: bool = False
    api_base_url: str = Field(OA_API, description="WeChat API (tests: a local fake)")
    wecom_api_base_url: str = Field(WECOM_API, description="WeCom API (tests: a local fake)")
    max_body_bytes: int = Field(
        32 * 1024, gt=0, le=1024 * 1024, description="larger callbacks are refused with 400"
    )
    official_accounts: list[OfficialAccountSettings] = Field(default_factory=list)
    wecom_apps: list[WecomAppSettings] = Field(default_factory=list)
    wecom_bots: list[WecomBotSettings] = Field(default_factory=list)

    @field_validator("api_base_url", "wecom_api_base_url")
    @classmethod
    def _urls_ok(cls, v: str) -> str:
        return _check_url(v)

    @model_validator(mode="after")
    def _unique(self) -> WechatSettings:
        paths: dict[str, str] = {}
        for acc in (*self.official_accounts, *self.wecom_apps, *self.wecom_bots):
            if acc.path in paths:
                raise ValueError(
                    f"accounts '{paths[acc.path]}' and '{acc.name}' share the path {acc.path}; "
                    "give each account its own path"
                )
            paths[acc.path] = acc.name
        for label, group in (
            ("official_accounts", self.official_accounts),
            ("wecom_apps and wecom_bots", [*self.wecom_apps, *self.wecom_bots]),
        ):
            names = [a.name for a in group]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{label}: duplicate account name(s) {dupes}")
        if self.enabled and not (self.official_accounts or self.wecom_apps or self.wecom_bots):
            raise ValueError(
                "enabled, but no account is configured: add official_accounts, wecom_apps "
                "or wecom_bots"
            )
        return self
