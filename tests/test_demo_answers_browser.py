"""The demo page in a real browser (issue 14): two-part questions get both parts answered,
once each, in the shopper's language; a request for a person gets the handoff text."""

from __future__ import annotations

import re

from playwright.async_api import Browser

from simulator.server import Simulator
from tests.support import RunningService
from tests.test_answer_integrity import sentences, without_source
from tests.test_widget_browser import (  # noqa: F401 - fixtures
    BOT_ROWS,
    W,
    answers_stored,
    ask,
    browser,
    open_chat,
    open_page,
    shop,
    svc,
    texts,
    widget_settings,
)


async def answer(page_texts: list[str], service: RunningService, count: int) -> str:
    stored = await answers_stored(service, count)
    assert page_texts == [s.strip() for s in stored], "the page shows what was stored"
    text = stored[-1]
    said = sentences(text)
    assert len(said) == len(set(said)), f"a sentence twice: {text!r}"
    return text


async def test_two_part_questions_and_a_request_for_a_person_on_the_demo_page(
    svc: RunningService,  # noqa: F811 - the fixtures imported above
    browser: Browser,  # noqa: F811
    simulator: Simulator,
) -> None:
    page = await open_page(browser, f"{svc.base_url}/")  # the demo shop
    await open_chat(page)

    async def ask_and_read(text: str, count: int) -> str:
        await ask(page, text)
        await page.locator(BOT_ROWS).nth(count - 1).wait_for(timeout=30_000)
        await page.locator(f"{W} .msg.streaming").wait_for(state="detached", timeout=30_000)
        return await answer(await texts(page, BOT_ROWS), svc, count)

    zh = await ask_and_read("我的订单 ORD-1001 到哪了？还有，耳机不喜欢可以退吗？", 1)
    assert "https://demo-shop.example/zh/help/returns" in zh, "the returns page is cited"
    zh = without_source(zh)
    # (whichever part is written first streams first)
    order, returns = sorted(zh.split("\n\n"), key=lambda part: "无理由退货" in part)
    assert "ORD-1001" in order and "退货" not in order
    assert "无理由退货" in returns
    assert not re.search(r"[A-Za-z]{4,}", zh.replace("ORD-1001", "")), "all in Chinese"

    en = await ask_and_read("Is the wool coat in stock? And can I return it if it doesn't fit?", 2)
    en = without_source(en)
    product, policy = sorted(en.split("\n\n"), key=lambda part: "within 7 days" in part)
    assert "in stock" in product and "within 7 days of delivery" in policy, en
    assert not re.search(r"[\u4e00-\u9fff]", en), "all in English"

    person = await ask_and_read("转人工，我要投诉", 3)
    assert person == svc.services.settings.reply.handoff_notice_zh
