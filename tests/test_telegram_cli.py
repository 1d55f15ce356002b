"""`swarmdesk telegram ...` against the fake Bot API, and the config mistakes it explains."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bot.cli import main
from bot.settings import load_settings
from channels.telegram import build
from channels.telegram.channel import TelegramConfigError
from channels.telegram.config import TelegramSettings
from simulator.fakes.telegram_api import FakeBotApi

TOKEN = "123456:TEST-token_abc"
SECRET = "cli-secret"


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi(usernames={TOKEN: "shop_test_bot"})
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
def config(tmp_path: Path, fake_api: FakeBotApi, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", SECRET)
    path = tmp_path / "swarmdesk.yaml"
    section = {
        "enabled": True,
        "bots": [{"account": "default", "api_base_url": fake_api.base_url}],
    }
    path.write_text(yaml.safe_dump({"channels": {"telegram": section}}), "utf-8")
    return path


async def swarmdesk(config: Path, *argv: str) -> int:
    # The CLI runs its own event loop: give it a thread, the fake keeps serving on ours.
    return await asyncio.to_thread(main, ["--config", str(config), "telegram", *argv])


async def test_set_webhook_info_and_delete(
    config: Path, fake_api: FakeBotApi, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await swarmdesk(config, "set-webhook", "--url", "https://shop.example.com/") == 0
    hook = fake_api.webhook(TOKEN)
    assert hook["url"] == "https://shop.example.com/telegram/default/webhook"
    assert hook["secret_token"] == SECRET
    assert hook["allowed_updates"] == ["message", "edited_message"]
    assert "@shop_test_bot -> https://shop.example.com/telegram/default/webhook" in (
        capsys.readouterr().out
    )

    assert await swarmdesk(config, "info") == 0
    out = capsys.readouterr().out
    assert "default: @shop_test_bot (id 123456)" in out
    assert "webhook: https://shop.example.com/telegram/default/webhook" in out
    assert "pending updates: 0" in out

    assert await swarmdesk(config, "delete-webhook") == 0
    assert fake_api.webhook(TOKEN) == {}
    assert await swarmdesk(config, "info") == 0
    assert "webhook: none" in capsys.readouterr().out


async def test_cli_explains_what_to_fix(
    config: Path,
    fake_api: FakeBotApi,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await swarmdesk(config, "set-webhook", "--url", "http://insecure.example.com") == 1
    assert "HTTPS URL must be provided" in capsys.readouterr().err
    assert await swarmdesk(config, "set-webhook") == 1
    assert "pass --url https://" in capsys.readouterr().err
    assert await swarmdesk(config, "info", "--bot", "nope") == 2
    assert "no bot 'nope'" in capsys.readouterr().err
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN")
    assert await swarmdesk(config, "info") == 2
    assert "set TELEGRAM_BOT_TOKEN to the bot token from @BotFather" in capsys.readouterr().err


def test_config_mistakes_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="has no bots"):
        TelegramSettings(enabled=True)
    with pytest.raises(ValidationError, match="share the account"):
        TelegramSettings(bots=[{"account": "a", "token_env": "X"}, {"account": "a"}])
    with pytest.raises(ValidationError, match="starting with '/'"):
        TelegramSettings(bots=[{"webhook_path": "telegram"}])

    settings = TelegramSettings(enabled=True, bots=[{"token_env": "SHOP_TOKEN"}])
    monkeypatch.delenv("SHOP_TOKEN", raising=False)
    with pytest.raises(TelegramConfigError, match="set SHOP_TOKEN"):
        build(settings)
    monkeypatch.setenv("SHOP_TOKEN", "not-a-token")
    with pytest.raises(TelegramConfigError, match="does not look like a bot token"):
        build(settings)
    monkeypatch.setenv("SHOP_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "has spaces!")
    with pytest.raises(TelegramConfigError, match="may only hold"):
        build(settings)
    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET")
    polling = settings.model_copy(update={"mode": "polling"})
    assert [c.name for c in build(polling)] == ["telegram"], "polling needs no secret"


def test_env_switches_the_section_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "swarmdesk.yaml"
    path.write_text(
        yaml.safe_dump({"channels": {"telegram": {"bots": [{"account": "shop"}]}}}), "utf-8"
    )
    monkeypatch.setenv("SWARMDESK_CHANNELS__TELEGRAM__ENABLED", "true")
    monkeypatch.setenv("SWARMDESK_CHANNELS__TELEGRAM__MODE", "polling")
    section = load_settings(path).channels.telegram
    assert (section.enabled, section.mode, [b.account for b in section.bots]) == (
        True,
        "polling",
        ["shop"],
    )
