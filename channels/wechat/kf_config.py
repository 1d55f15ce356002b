"""The `channels.wecom_kf` section of swarmdesk.yaml: WeChat Customer Service (微信客服).

One WeCom corp has one customer-service callback URL (set under 微信客服 → API in the WeCom
admin console) and any number of service accounts (客服账号, `open_kfid`), each named here;
conversations carry that name. Secrets (the 微信客服 Secret, the EncodingAESKey) come from
environment variables; the callback Token may be written here or read from `token_env`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from channels.wechat.config import (
    _NAME_RE,
    MEDIA_TEXT,
    WECOM_API,
    _Callback,
    _check_path,
    _check_url,
    _secret,
)
from config_section import ConfigSection

VOICE_TEXT = "收到您的语音啦！我暂时还听不了语音，请用文字写下您的问题，我马上为您解答。"


class KfAccountSettings(ConfigSection):
    """One service account (客服账号)."""

    name: str = Field(pattern=_NAME_RE, description="account name, stored on conversations")
    open_kfid: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the account's ID (wk...) in the console"
    )
    welcome_text: str = Field(
        "", description="sent when a customer opens the chat (enter_session; empty: nothing)"
    )
    reception: Literal["wecom", "console"] = Field(
        "wecom",
        description="where people take over: in WeCom's own reception (the session moves to "
        "the pool or a servicer) or in the swarmdesk console (the session stays with the API)",
    )
    handoff_to: Literal["pool", "servicer"] = Field(
        "pool", description="on a handoff, move the session to the reception pool or a servicer"
    )
    servicer_userid: str | None = Field(
        None, description="the WeCom member userid that receives handoffs (handoff_to: servicer)"
    )

    @model_validator(mode="after")
    def _servicer(self) -> KfAccountSettings:
        if self.handoff_to == "servicer" and not self.servicer_userid:
            raise ValueError(
                f"account '{self.name}': handoff_to 'servicer' needs servicer_userid (the "
                "WeCom member who receives handoffs)"
            )
        return self


class WecomKfSettings(ConfigSection):
    enabled: bool = False
    corp_id: str = Field("", description="the corp ID (ww...), under My Company in the console")
    secret_env: str = Field(
        "", description="environment variable holding the 微信客服 Secret (not an app's Secret)"
    )
    path: str = Field("/wecom/kf", description="callback URL path set under 微信客服 → API")
    token: str | None = Field(None, description="the callback Token (or name it with token_env)")
    token_env: str | None = Field(None, description="environment variable holding the Token")
    aes_key_env: str = Field(
        "", description="environment variable holding the 43-character EncodingAESKey"
    )
    api_base_url: str = Field(WECOM_API, description="WeCom API (tests: a local fake)")
    max_body_bytes: int = Field(
        32 * 1024, gt=0, le=1024 * 1024, description="larger callbacks are refused with 400"
    )
    safety_pull_seconds: float = Field(
        60.0,
        ge=0,
        description="pull every account this often even without a callback (lost callbacks); "
        "0: only at start and on callbacks",
    )
    media_text: str = Field(MEDIA_TEXT, description="answer to images, videos and files")
    voice_text: str = Field(VOICE_TEXT, description="answer to voice messages")
    accounts: list[KfAccountSettings] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str) -> str:
        return _check_path(v)

    @field_validator("api_base_url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        return _check_url(v)

    @model_validator(mode="after")
    def _complete(self) -> WecomKfSettings:
        for label, items in (
            ("name", [a.name for a in self.accounts]),
            ("open_kfid", [a.open_kfid for a in self.accounts]),
        ):
            dupes = sorted({n for n in items if items.count(n) > 1})
            if dupes:
                raise ValueError(f"accounts: duplicate {label}(s) {dupes}")
        if not self.enabled:
            return self
        missing = [
            key
            for key, value in (
                ("corp_id", self.corp_id),
                ("secret_env", self.secret_env),
                ("aes_key_env", self.aes_key_env),
                ("token (or token_env)", self.token or self.token_env),
                ("accounts", self.accounts),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"enabled, but {', '.join(missing)} not set: copy them from 微信客服 → API "
                "(callback) and the service accounts list in the WeCom admin console"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.corp_id):
            raise ValueError(f"corp_id '{self.corp_id}' is not a WeCom corp ID (ww...)")
        return self

    def callback(self) -> _Callback:
        """The callback credentials, resolved with the same rules as the other WeCom kinds."""
        return _Callback(
            name="wecom_kf",
            path=self.path,
            token=self.token,
            token_env=self.token_env,
            aes_key_env=self.aes_key_env,
        )

    def resolve_secret(self) -> str:
        return _secret(self.secret_env, f"微信客服 Secret of corp {self.corp_id}")
