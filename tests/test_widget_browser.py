"""The widget in a real browser: Debian's Chromium, headless, driven by Playwright.

Pages come from a small "shop" server on its own origin (as on a shop's site) or from the
demo shop that swarmdesk serves at /. The README's screenshots (docs/screenshots/) are taken here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout
from sqlalchemy import select

from bot.settings import Settings
from simulator.server import Simulator
from storage.models import Message
from tests.support import RunningService, eventually, start_service
from tests.widget_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SCREENSHOTS,
    SECRET,
    SECRET_ENV,
    ShopServer,
    free_port,
    start_on,
    widget,
    widget_config,
)

W = "swarmdesk-widget"  # Playwright's CSS selectors reach into the open shadow root
BOT_ROWS = f"{W} .msg.from-bot:not(.greeting):not(.typing)"
PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5f0a8e40000000049454e44ae426082"
)


@pytest.fixture
async def shop() -> AsyncIterator[ShopServer]:
    server = ShopServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def widget_settings(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shop: ShopServer,
) -> Settings:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return settings_factory(sqlite_url, channels=widget_config(tmp_path, shop.origin))


@pytest.fixture
async def svc(widget_settings: Settings, shop: ShopServer) -> AsyncIterator[RunningService]:
    s = await start_service(widget_settings)
    shop.service_url = s.base_url
    yield s
    await s.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


async def open_page(browser: Browser, url: str, **context: Any) -> Page:
    ctx = await browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context})
    page = await ctx.new_page()
    await page.goto(url)
    await page.locator(f"{W} .launcher").wait_for(state="visible")
    return page


async def open_chat(page: Page) -> None:
    await page.locator(f"{W} .launcher").click()
    await page.locator(f"{W} .panel").wait_for(state="visible")
    await page.locator(f"{W} .status", has_text="Online").wait_for()


async def ask(page: Page, text: str) -> None:
    await page.locator(f"{W} textarea").fill(text)
    await page.keyboard.press("Enter")


async def texts(page: Page, selector: str) -> list[str]:
    return [t.strip() for t in await page.locator(f"{selector} .text").all_inner_texts()]


async def answers_stored(svc: RunningService, count: int) -> list[str]:
    """Texts of the bot's delivered widget answers, once there are `count`."""

    async def probe() -> list[str] | None:
        async with svc.services.sessions() as s:
            q = select(Message).where(
                Message.channel == "widget", Message.direction == "out", Message.status == "sent"
            )
            rows = list((await s.execute(q.order_by(Message.id))).scalars())
        return [m.text for m in rows] if len(rows) >= count else None

    return await eventually(probe)


STREAMING_TEXT = (
    "() => { const s = document.querySelector('swarmdesk-widget').shadowRoot"
    ".querySelector('.streaming .text'); return s ? s.textContent : null; }"
)


def shot(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / name


async def test_visitor_chats_and_sees_the_answer_streamed(
    svc: RunningService, browser: Browser, simulator: Simulator
) -> None:
    # Slower, longer answers, so the page is seen mid-stream.
    simulator.config.tokens_per_second = 15
    simulator.config.reply_tokens = 45
    page = await open_page(browser, f"{svc.base_url}/")  # the demo shop
    await page.wait_for_timeout(300)  # fonts and the launcher's entrance settle
    await page.screenshot(path=shot("widget-closed.png"))

    launcher = page.locator(f"{W} .launcher")
    assert await launcher.get_attribute("aria-expanded") == "false"
    await launcher.focus()
    await page.keyboard.press("Enter")  # keyboard users open it like a button
    await page.locator(f"{W} .status", has_text="Online").wait_for()
    assert await launcher.get_attribute("aria-expanded") == "true"
    textarea = page.locator(f"{W} textarea")
    assert await textarea.evaluate("el => el.getRootNode().activeElement === el")
    greeting = await page.locator(f"{W} .greeting .text").inner_text()
    assert greeting.startswith("Hi! Ask me about orders")
    chips = await page.locator(f"{W} .quick .chip").all_inner_texts()
    assert chips[0] == "Where is my order?"
    await page.screenshot(path=shot("widget-open.png"))

    await ask(page, "Do you have the Merino Wool Sweater in size M?")
    streaming = page.locator(f"{W} .msg.streaming .text")
    await streaming.wait_for()
    partial = await page.evaluate(STREAMING_TEXT)
    while partial is not None and len(partial) < 40:  # a few words in, not all of them
        await asyncio.sleep(0.02)
        partial = await page.evaluate(STREAMING_TEXT) or partial
        if await page.locator(f"{W} .msg.streaming").count() == 0:
            break
    await page.screenshot(path=shot("widget-streaming.png"))
    assert partial

    await page.locator(f"{W} .msg.streaming").wait_for(state="detached", timeout=30_000)
    [stored] = await answers_stored(svc, 1)
    shown = await texts(page, BOT_ROWS)
    assert shown == [stored.strip()]
    assert stored.startswith(partial), "the streamed text grows into the answer"
    assert await texts(page, f"{W} .msg.from-me") == [
        "Do you have the Merino Wool Sweater in size M?"
    ]
    assert await page.locator(f"{W} .msg.from-me .state").count() == 0  # delivered
    assert await page.locator(f"{W} .quick").is_hidden()
    log = page.locator(f"{W} .log")
    assert (await log.get_attribute("role"), await log.get_attribute("aria-live")) == (
        "log",
        "polite",
    )
    assert await page.locator(BOT_ROWS).get_attribute("aria-hidden") is None
    assert await page.locator(f"{W} .msg.from-bot:not(.greeting) .who").inner_text() == (
        "Assistant"
    )

    await page.keyboard.press("Escape")
    await page.locator(f"{W} .panel").wait_for(state="hidden")
    assert await launcher.evaluate("el => el.getRootNode().activeElement === el")


async def test_reload_shows_history_and_an_answer_given_while_the_page_was_closed(
    svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    page = await open_page(browser, shop.url())
    await open_chat(page)
    await ask(page, "How long does a refund take?")
    [first] = await answers_stored(svc, 1)
    await page.locator(BOT_ROWS).wait_for()
    before = await texts(page, f"{W} .msg:not(.greeting)")
    assert before == ["How long does a refund take?", first.strip()]

    await page.reload()
    await page.locator(f"{W} .status", has_text="Online").wait_for()  # still open
    await page.locator(BOT_ROWS).wait_for()
    assert await texts(page, f"{W} .msg:not(.greeting)") == before

    # A question whose answer comes only after the page is gone.
    await ask(page, "Tell me about your shop [[sim:delay_ms=1500]]")
    await page.locator(f"{W} .msg.from-me:not(.pending)").nth(1).wait_for()
    await page.locator(f"{W} .close").click()
    context = page.context
    await page.close()
    stored = await answers_stored(svc, 2)

    page = await context.new_page()
    await page.goto(shop.url())
    badge = page.locator(f"{W} .badge")
    await badge.wait_for(state="visible")
    assert await badge.inner_text() == "1"
    assert "1 unread" in (await page.locator(f"{W} .launcher").get_attribute("aria-label") or "")
    await open_chat(page)
    await page.locator(BOT_ROWS).nth(1).wait_for()
    assert await texts(page, BOT_ROWS) == [t.strip() for t in stored]
    assert await badge.is_hidden()


async def test_dropped_connection_resumes_without_gap_or_duplicate(
    svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    page = await open_page(browser, shop.url())
    await open_chat(page)
    await ask(page, "Tell me a story about your shop [[sim:tps=30]] [[sim:tokens=120]]")
    streaming = page.locator(f"{W} .msg.streaming .text")
    await streaming.wait_for()

    samples: list[str] = []
    dropped_at: int | None = None
    states: list[str | None] = []
    while await page.locator(f"{W} .msg.streaming").count():
        text = await page.evaluate(STREAMING_TEXT)
        if text is not None:
            samples.append(text)
        if dropped_at is None and text and len(text) > 30:
            assert widget(svc).drop_connections() == 1  # the network goes away mid-answer
            dropped_at = len(samples)
        if dropped_at is not None:
            states.append(await page.locator(f"{W} .sd").get_attribute("data-state"))
        await asyncio.sleep(0.03)
    assert dropped_at is not None
    assert "reconnecting" in states  # the page noticed the drop...
    assert "online" in states[states.index("reconnecting") :]  # ...and came back mid-answer

    [final] = await answers_stored(svc, 1)
    assert await texts(page, BOT_ROWS) == [final.strip()]
    assert await texts(page, f"{W} .msg.from-me") == [
        "Tell me a story about your shop [[sim:tps=30]] [[sim:tokens=120]]"
    ]
    # Every partial text seen, before and after the drop, is a prefix of the answer:
    # a lost delta or a repeated one would show as a text that is not.
    after = samples[dropped_at:]
    assert after and len(after[-1]) > len(samples[dropped_at - 1])
    for s in samples:
        assert final.startswith(s), f"{s!r} is not a prefix of the answer"


async def test_a_disallowed_origin_or_unknown_site_is_refused_on_the_page(
    svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    for site, reason in (("demo", "may not use site 'demo'"), ("nosuch", "no widget site")):
        ctx = await browser.new_context()
        page = await ctx.new_page()
        errors: list[str] = []

        def on_console(msg: ConsoleMessage, errors: list[str] = errors) -> None:
            if msg.type == "error":
                errors.append(msg.text)

        page.on("console", on_console)
        await page.goto(shop.url(site=site))
        await page.locator(f"{W} .launcher").click()
        banner = page.locator(f"{W} .banner-text")
        await banner.wait_for(state="visible")
        assert await banner.inner_text() == "This chat isn’t available on this page."
        assert await page.locator(f"{W} textarea").is_disabled()
        # The shop's developer finds the reason in the browser console.
        await eventually(lambda r=reason, es=errors: _value(any(r in e for e in es)))
        await ctx.close()


async def _value(value: bool) -> bool:
    return value


async def test_unreachable_service_shows_it_and_sends_what_waited(
    widget_settings: Settings, browser: Browser, shop: ShopServer
) -> None:
    port = free_port()
    svc = await start_on(widget_settings, port)
    shop.service_url = svc.base_url
    try:
        demo = await open_page(browser, f"{svc.base_url}/")
        page = await open_page(browser, shop.url())
        for p in (demo, page):
            await open_chat(p)
        await svc.stop()
        for p in (demo, page):
            banner = p.locator(f"{W} .banner-text")
            await banner.wait_for(state="visible", timeout=20_000)
            assert (await banner.inner_text()).startswith("Can’t reach the chat service.")
            await ask(p, "Is anyone there?")
            pending = p.locator(f"{W} .msg.pending .state")
            await pending.wait_for()
            assert await pending.inner_text() == "Will be sent when the connection is back"
        await demo.screenshot(path=shot("widget-offline.png"))

        # What waits to be sent survives a reload of the page.
        await page.reload()
        await page.locator(f"{W} .msg.pending", has_text="Is anyone there?").wait_for()

        svc = await start_on(widget_settings, port)
        for p in (demo, page):
            # "Retry now", unless the page's own next try was quicker.
            with contextlib.suppress(PlaywrightTimeout):
                await p.locator(f"{W} .banner-retry").click(timeout=2_000)
            await p.locator(f"{W} .banner").wait_for(state="hidden", timeout=20_000)
            await p.locator(BOT_ROWS).wait_for(timeout=20_000)
            assert await p.locator(f"{W} .msg.pending").count() == 0
            assert await texts(p, f"{W} .msg.from-me") == ["Is anyone there?"]
        answers = [a.strip() for a in await answers_stored(svc, 2)]
        for p in (demo, page):
            [shown] = await texts(p, BOT_ROWS)
            assert shown in answers
        await asyncio.sleep(0.3)  # room for a wrong second answer
        assert len(await answers_stored(svc, 2)) == 2  # one per page, none twice
    finally:
        await svc.stop()


async def test_phone_layout_chinese_texts_and_agents(
    svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    page = await open_page(
        browser,
        f"{svc.base_url}/",
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
    )
    await open_chat(page)
    box = await page.locator(f"{W} .panel").bounding_box()
    assert box is not None and (box["width"], box["height"]) == (390, 844)
    await page.locator(f"{W} .quick .chip").first.click()
    await page.locator(BOT_ROWS).wait_for()
    await page.screenshot(path=shot("widget-mobile.png"))
    await page.context.close()

    # A Chinese page gets Chinese texts; a person's answers are marked as theirs.
    page = await open_page(browser, shop.url(lang="zh-CN"))
    assert await page.locator(f"{W} .launcher").get_attribute("aria-label") == "打开在线客服"
    await page.locator(f"{W} .launcher").click()
    await page.locator(f"{W} .status", has_text="在线").wait_for()
    assert await page.locator(f"{W} textarea").get_attribute("placeholder") == "请输入消息…"
    assert (await page.locator(f"{W} .greeting .text").inner_text()).startswith("您好")
    await ask(page, "我要找人工客服")
    await page.locator(BOT_ROWS).wait_for()
    conv = await page.evaluate("() => window.SwarmDesk._state.conv")
    await svc.services.host.send_message(conv, "您好，我是客服小美。", sender="agent")
    agent = page.locator(f"{W} .msg.from-agent")
    await agent.wait_for()
    assert await agent.locator(".who").inner_text() == "人工客服"
    assert await agent.locator(".text").inner_text() == "您好，我是客服小美。"

    # The shop page's own styles (serif, red, `button {all: unset}`) stay outside.
    styles = await page.evaluate(
        "() => { const r = document.querySelector('swarmdesk-widget').shadowRoot;"
        " const t = getComputedStyle(r.querySelector('textarea'));"
        " const b = r.querySelector('.send').getBoundingClientRect();"
        " return [t.fontFamily, t.color, b.width]; }"
    )
    assert styles[0].startswith("system-ui") and styles[1] != "rgb(255, 0, 0)"
    # Sub-pixel layout may give 39.99: what matters is the page's `all: unset` didn't apply.
    assert abs(styles[2] - 40) < 0.5


async def test_image_attachment_and_sse_fallback(
    svc: RunningService, browser: Browser, shop: ShopServer, tmp_path: Path
) -> None:
    # A page where WebSockets are blocked uses Server-Sent Events + POST.
    page = await open_page(browser, shop.url(attrs='data-transport="sse"'))
    await open_chat(page)
    await ask(page, "Hello over SSE")
    await page.locator(BOT_ROWS).wait_for()
    [answer] = await answers_stored(svc, 1)
    assert await texts(page, BOT_ROWS) == [answer.strip()]

    image = tmp_path / "parcel.png"
    image.write_bytes(PNG_1PX)
    await page.locator(f"{W} input.file").set_input_files(str(image))
    img = page.locator(f"{W} .msg.from-me:not(.pending) img.image")
    await img.wait_for()
    src = await img.get_attribute("src")
    assert src is not None and src.startswith(f"{svc.base_url}/widget/v1/files/")
    assert await img.get_attribute("alt") == "Image from You"
    await page.locator(BOT_ROWS).nth(1).wait_for()

    await page.reload()
    await page.locator(BOT_ROWS).nth(1).wait_for()
    assert await page.locator(f"{W} .msg.from-me img.image").count() == 1
    assert await texts(page, f"{W} .msg.from-me") == ["Hello over SSE"]
