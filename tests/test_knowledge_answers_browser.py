"""A cited answer in a real browser: the widget shows the source's address as a link that
opens in a new tab (and nothing else of the message becomes markup)."""

from __future__ import annotations

from playwright.async_api import Browser

from tests.support import RunningService
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
    widget_settings,
)

RETURNS_PAGE = "https://demo-shop.example/help/returns"


async def test_the_widget_shows_the_cited_page_as_a_link(
    svc: RunningService,  # noqa: F811 - the fixtures imported above
    browser: Browser,  # noqa: F811
) -> None:
    page = await open_page(browser, f"{svc.base_url}/")  # the demo shop
    await open_chat(page)
    await ask(page, "Can I return opened earbuds after 10 days?")
    await page.locator(BOT_ROWS).first.wait_for(timeout=30_000)
    await page.locator(f"{W} .msg.streaming").wait_for(state="detached", timeout=30_000)
    (stored,) = await answers_stored(svc, 1)
    assert stored.endswith(f" — {RETURNS_PAGE}"), stored

    row = page.locator(BOT_ROWS).first
    assert (await row.locator(".text").inner_text()).strip() == stored.strip()
    links = row.locator(".text a")
    assert await links.count() == 1
    link = links.first
    assert await link.inner_text() == RETURNS_PAGE
    assert await link.get_attribute("href") == RETURNS_PAGE
    assert await link.get_attribute("target") == "_blank"
    assert await link.get_attribute("rel") == "noopener noreferrer"
    # Only the address is a link: the rest of the message stays plain text.
    assert await row.locator(".text *").count() == 1
