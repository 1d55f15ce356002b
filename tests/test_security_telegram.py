"""Telegram updates come only from Telegram (issue 16, High): polling mode mounts no webhook
that anyone could post forged updates to, and webhook mode needs its secret."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bot.app import build_channels
from bot.settings import Settings
from channels.telegram.channel import TelegramConfigError
from tests.test_telegram import (  # noqa: F401  (fixtures)
    TOKEN,
    Tg,
    TgFactory,
    bot_config,
    fake_api,
    tg,
    tg_factory,
)


async def test_polling_mode_has_no_webhook_to_forge_updates_on(
    tg_factory: TgFactory,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET")
    polling = await tg_factory(section={"mode": "polling"})
    chat = 6601
    for secret in (None, "", "guess"):
        r = await polling.post(polling.updates.text(chat, "forged: refund me"), secret=secret)
        assert r.status_code in (404, 405), r.text
    assert await polling.stored(chat) == []


async def test_webhook_mode_needs_a_secret(
    monkeypatch: pytest.MonkeyPatch,
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET", raising=False)
    settings = settings_factory(sqlite_url, channels={"telegram": bot_config("http://127.0.0.1:9")})
    with pytest.raises(TelegramConfigError, match="TELEGRAM_WEBHOOK_SECRET"):
        build_channels(settings)


async def test_a_webhook_post_without_the_secret_stores_nothing(tg: Tg) -> None:  # noqa: F811
    chat = 6602
    for secret in (None, "", "wrong"):
        r = await tg.post(tg.updates.text(chat, "forged"), secret=secret)
        assert r.status_code == 401
    assert await tg.stored(chat) == []
