"""A flood of anonymous shoppers cannot spend without limit: by default they share a daily
model budget, after which they get the canned text and a person; a shopper the shop vouched
for is not held to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.settings import Settings
from channels.widget.identity import sign
from orchestration.config import BudgetSettings
from storage.models import Message
from tests.support import eventually
from tests.widget_support import SECRET, SHOP_ORIGIN, new_token, start_widget_service

QUESTION = "what is the fabric of this coat made of? [[sim:tokens=30]]"


def test_anonymous_traffic_has_a_daily_budget_by_default() -> None:
    assert BudgetSettings().anonymous_per_day is not None


async def test_anonymous_shoppers_stop_at_the_budget_verified_ones_go_on(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    def factory(db: str, **overrides: Any) -> Settings:
        return settings_factory(db, budgets={"anonymous_per_day": 1e-9}, **overrides)

    svc = await start_widget_service(sqlite_url, factory, tmp_path, monkeypatch)
    exhausted = svc.services.settings.budgets.exhausted_text
    try:

        async def ask(user: dict[str, str] | None) -> str:
            body = {"token": new_token(), "client_id": "c1", "text": QUESTION}
            if user:
                body["user"] = user  # type: ignore[assignment]
            r = await svc.client.post(
                "/widget/v1/messages?site=shop", json=body, headers={"Origin": SHOP_ORIGIN}
            )
            assert r.status_code == 202, r.text
            ack = r.json()

            async def answer() -> str | None:
                async with svc.services.sessions() as s:
                    q = select(Message.text).where(
                        Message.reply_to_id == ack["message_id"], Message.status == "sent"
                    )
                    return (await s.execute(q)).scalar_one_or_none()

            return await eventually(answer)

        assert await ask(None) != exhausted  # the first answer spends the tiny budget
        assert await ask(None) == exhausted
        vouched = {"id": "u-42", "hash": sign(SECRET, "u-42")}
        assert await ask(vouched) != exhausted
    finally:
        await svc.stop()
