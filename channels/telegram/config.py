"""The `channels.telegram` section of swarmdesk.yaml: one entry per bot (channel account).

Tokens and webhook secrets never live in the file: each bot names the environment variables
holding them.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection, matching

PRODUCTION_API = "https://api.telegram.org"
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
AccountName = Annotated[
    str, matching(_ACCOUNT_RE, "use 1-64 letters, digits, '_' or '-' (it appears in the URL)")
]


class TelegramTexts(ConfigSection):
    """What the bot says by itself (not written by a model)."""

    welcome: str = "Hello! Ask me anything about your order, shipping or returns."
    help: str = (
        "Just write your question and I will answer right away.\n"
        "/human - talk to a person from our team\n"
        "/help - this message"
    )
    human: str = "OK, a person from our team will answer you here as soon as possible."
    unreadable: str = (
        "Sorry, I can't read voice messages, stickers or files yet. "
        "Please write your question as text."
    )
    unreadable_handoff: str = (
        "I can't read this kind of message yet, so I've asked a person from our team to help."
    )


class TelegramBotSettings(ConfigSection):
    account: AccountName = Field(
        "default", description="the channel account this bot answers for (unique, a-z 0-9 _ -)"
    )
    token_env: str = Field(
        "TELEGRAM_BOT_TOKEN", description="environment variable with the token from @BotFather"
    )
    secret_token_env: str = Field(
        "TELEGRAM_WEBHOOK_SECRET",
        description="environment variable with the webhook secret (1-256 of A-Z a-z 0-9 _ -)",
    )
    webhook_path: str | None = Field(
        None, description="path of this bot's webhook; default /telegram/<account>/webhook"
    )
    username: str | None = Field(
        None, description="the bot's @username (read with getMe when not given)"
    )
    api_base_url: str = Field(PRODUCTION_API, description="Bot API server (or a local one)")
    request_timeout_seconds: float = Field(20.0, gt=0)
    group_replies: Literal["mention", "always", "never"] = Field(
        "mention",
        description="in groups answer only when mentioned or replied to, always, or never",
    )
    unreadable_media: Literal["reply", "handoff", "ignore"] = Field(
        "reply",
        description="voice, stickers, files without caption: say so, ask a person, or nothing",
    )
    drafts: bool = Field(True, description="stream private answers with sendMessageDraft")
    draft_updates_per_second: float = Field(2.0, gt=0, le=20)
    edit_interval_seconds: float = Field(
        1.0, ge=0.2, description="streaming by edits (groups): at most one edit this often"
    )
    parse_mode: Literal["HTML", "MarkdownV2", "none"] = Field(
        "HTML", description="formatting of final messages (streamed text is always plain)"
    )
    typing: bool = True
    texts: TelegramTexts = Field(default_factory=TelegramTexts)

    @field_validator("webhook_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "{" in v or " " in v):
            raise ValueError("a plain path starting with '/', e.g. /telegram/shop/webhook")
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        return v.lstrip("@") if v else v

    @field_validator("api_base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("api_base_url must start with http:// or https://")
        return v.rstrip("/")

    @property
    def path(self) -> str:
        return self.webhook_path or f"/telegram/{self.account}/webhook"

    def token(self) -> str | None:
        return os.environ.get(self.token_env) or None

    def secret_token(self) -> str | None:
        return os.environ.get(self.secret_token_env) or None

    def credentials_problem(self, *, need_secret: bool) -> str | None:
        """What is wrong with the environment for this bot, said so a person can fix it."""
        token = self.token()
        if not token:
            return (
                f"channels.telegram.bots[{self.account}]: set {self.token_env} to the bot token "
                "from @BotFather (or name another variable in token_env)"
            )
        if ":" not in token or not token.split(":", 1)[0].isdigit():
            return (
                f"{self.token_env} does not look like a bot token ('123456789:AA...'); "
                "copy it again from @BotFather"
            )
        if not need_secret:
            return None
        secret = self.secret_token()
        if not secret:
            return (
                f"channels.telegram.bots[{self.account}]: set {self.secret_token_env} to a random "
                "secret (1-256 of A-Z a-z 0-9 _ -); Telegram sends it with every update"
            )
        if not _SECRET_RE.match(secret):
            return (
                f"{self.secret_token_env} may only hold 1-256 of A-Z a-z 0-9 _ - "
                "(Telegram refuses other secrets)"
            )
        return None


class TelegramSettings(ConfigSection):
    enabled: bool = False
    mode: Literal["webhook", "polling"] = Field(
        "webhook", description="polling is for development (`swarmdesk telegram poll`)"
    )
    bots: list[TelegramBotSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> TelegramSettings:
        if self.enabled and not self.bots:
            raise ValueError(
                "channels.telegram is enabled but has no bots: add one under "
                "channels.telegram.bots (account, token_env, secret_token_env)"
            )
        for what, values in (
            ("account", [b.account for b in self.bots]),
            ("webhook path", [b.path for b in self.bots]),
            ("token_env", [b.token_env for b in self.bots]),
        ):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"two bots share the {what} {dupes}; each bot needs its own")
        return self
