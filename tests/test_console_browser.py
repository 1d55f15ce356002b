"""The agent console in a real browser (Debian's Chromium, headless, via Playwright), against
the real service: a shopper asks for a person in the widget, an agent signs in at /console,
sees the conversation arrive live, claims it and answers; the shopper sees the answer in the
widget; the agent hands back and the bot answers again. The README's console screenshots
(docs/screenshots/console-*.png) are taken here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from functools import partial

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page

from bot.console.auth import hash_password
from bot.settings import ConsoleSettings, Settings
from channels.widget.identity import sign
from storage import agents
from tests import test_widget_browser as wb
from tests.support import RunningService, start_service
from tests.widget_support import SECRET, ShopServer

# The widget tests' fixtures: the service with a widget site, the shop's page, Chromium.
browser = wb.browser
shop = wb.shop
svc = wb.svc
widget_settings = wb.widget_settings

PASSWORD = "correct horse battery"
LAPTOP = {"width": 1366, "height": 768}


@pytest.fixture
async def impatient_svc(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    """A shop that flags a conversation as overdue after a second of waiting."""
    s = await start_service(settings_factory(sqlite_url, console={"waiting_alert_seconds": 1}))
    yield s
    await s.stop()


@pytest.fixture
async def csat_svc(widget_settings: Settings, shop: ShopServer) -> AsyncIterator[RunningService]:
    """The widget shop, whose widget shoppers are asked to rate a resolved conversation."""
    console = ConsoleSettings(satisfaction_channels=["widget"])
    s = await start_service(widget_settings.model_copy(update={"console": console}))
    shop.service_url = s.base_url
    yield s
    await s.stop()


async def add_agent(svc: RunningService, name: str, email: str, role: str = "agent") -> int:
    row = await svc.services.pipeline.parts.db.write(
        partial(
            agents.add_agent,
            name=name,
            email=email,
            role=role,
            password_hash=await hash_password(PASSWORD),
        )
    )
    return row.id


async def open_console(browser: Browser, svc: RunningService, **context: object) -> Page:
    ctx = await browser.new_context(viewport=LAPTOP, **context)  # type: ignore[arg-type]
    page = await ctx.new_page()
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            problems.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.problems = problems  # type: ignore[attr-defined]
    await page.goto(f"{svc.base_url}/console")
    return page


def problems(page: Page) -> list[str]:
    """Script errors and CSP refusals the page met. Refused API calls (the 401 before signing
    in, the 409 of a reply before claiming) are the page's to explain, not problems."""
    seen: list[str] = page.problems  # type: ignore[attr-defined]
    return [p for p in seen if not p.startswith("Failed to load resource")]


async def sign_in(page: Page, email: str, password: str = PASSWORD) -> None:
    await page.locator("#email").fill(email)
    await page.locator("#password").fill(password)
    await page.keyboard.press("Enter")


async def history(page: Page, cls: str) -> list[str]:
    rows = page.locator(f"#history .msg.{cls} .text")
    return [t.strip() for t in await rows.all_inner_texts()]


async def test_agent_takes_over_a_widget_chat_and_hands_it_back(
    svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    await add_agent(svc, "Mei", "mei@shop.test")
    await add_agent(svc, "Leo", "leo@shop.test")
    console = await open_console(browser, svc, locale="en-GB")
    await console.locator("#signin-form").wait_for()
    assert await console.evaluate("document.activeElement.id") == "email"
    await console.screenshot(path=wb.shot("console-signin.png"))

    await sign_in(console, "mei@shop.test", "not the password")
    error = console.locator("#signin-error")
    await error.filter(has_text="Wrong e-mail address or password.").wait_for()
    await sign_in(console, "mei@shop.test")
    await console.locator("#desk").wait_for()
    await console.locator("#live", has_text="Live").wait_for()
    assert await console.locator("#me").inner_text() == "Mei"
    tab = console.locator('[data-view="waiting"]')
    assert await tab.get_attribute("aria-selected") == "true"
    await console.locator("#list-empty", has_text="Nobody is waiting").wait_for()

    # The shopper asks for a person in the widget on the shop's page...
    # (a signed-in shop user, so the console can show her name)
    who = f'data-user-id="u-42" data-user-hash="{sign(SECRET, "u-42")}" data-user-name="Ann Li"'
    shopper = await wb.open_page(browser, shop.url(attrs=who))
    await wb.open_chat(shopper)
    await wb.ask(shopper, "I want to talk to a human")
    told = shopper.locator(f"{wb.W} .msg:not(.greeting):not(.from-me):not(.typing)")
    await told.first.wait_for()

    # ...and it appears in the agent's Waiting view without a reload.
    item = console.locator("#list .item")
    await item.wait_for()
    assert await item.count() == 1
    assert await console.locator("#count-waiting").inner_text() == "1"
    assert (await item.locator(".age").inner_text()).startswith("waited")
    assert await item.locator(".name").inner_text() == "Ann Li"
    assert await item.locator(".chan").inner_text() == "Web chat · shop"

    # Keyboard: j opens the first conversation; its history and handoff card show.
    await console.locator("#list").focus()
    await console.keyboard.press("j")
    assert await item.get_attribute("aria-selected") == "true"
    await console.locator("#history .msg.from-contact").first.wait_for()
    assert await history(console, "from-contact") == ["I want to talk to a human"]
    card = console.locator("#card")
    await card.locator("dt", has_text="Why").wait_for()
    assert await console.locator("#c-owner").inner_text() == "Waiting for a person"
    assert (await console.locator("#c-sub").inner_text()).startswith("Web chat · shop · ")
    await console.screenshot(path=wb.shot("console-waiting.png"))

    # Replying before claiming is refused in words, and nothing reaches the shopper.
    await console.keyboard.press("r")
    assert await console.evaluate("document.activeElement.id") == "text"
    await console.keyboard.type("Hello early")
    await console.keyboard.press("Control+Enter")
    await console.locator("#c-error", has_text="Claim it first").wait_for()
    assert await console.locator("#text").input_value() == "Hello early"

    await console.locator('[data-act="claim"]').click()
    await console.locator("#c-owner", has_text="You").wait_for()
    assert await console.locator('[data-act="claim"]').is_hidden()
    assert await console.evaluate("document.activeElement.id") == "text"
    # It leaves Waiting for Mine.
    await console.locator("#list-empty", has_text="Nobody is waiting").wait_for()
    assert await console.locator("#count-waiting").inner_text() == ""
    await console.locator('[data-view="mine"]').click()
    await item.filter(has_text="Ann Li").wait_for()
    assert await item.get_attribute("aria-selected") == "true"
    await console.locator("#text").focus()
    await console.locator("#text").fill("Hi, I'm Mei from the shop. How can I help?")
    await console.keyboard.press("Control+Enter")
    await console.locator("#history .msg.from-agent").wait_for()
    assert await history(console, "from-agent") == ["Hi, I'm Mei from the shop. How can I help?"]
    assert await console.locator("#history .msg.from-agent .who").inner_text() == "You"
    assert await console.locator("#text").input_value() == ""

    # The shopper sees the person's answer in the widget.
    agent_row = shopper.locator(f"{wb.W} .msg.from-agent")
    await agent_row.wait_for()
    assert await agent_row.locator(".text").inner_text() == (
        "Hi, I'm Mei from the shop. How can I help?"
    )

    # A note stays inside; the shopper's next message shows in the console, unanswered.
    await console.locator("#text").fill("Regular customer, be generous")
    await console.locator("#note").click()
    await console.locator("#history .msg.note").wait_for()
    await wb.ask(shopper, "My parcel ORD-1001 arrived broken")
    await console.locator("#history .msg.from-contact", has_text="ORD-1001").wait_for()
    await console.screenshot(path=wb.shot("console-conversation.png"))
    bots_before = await shopper.locator(wb.BOT_ROWS).count()

    await console.locator('[data-act="handback"]').click()
    await console.locator("#c-owner", has_text="Bot").wait_for()
    await console.locator("#card .events li", has_text="A person → Bot").wait_for()

    # The bot answers the next message again.
    await wb.ask(shopper, "Where is my order ORD-1001?")
    await shopper.locator(wb.BOT_ROWS).nth(bots_before).wait_for()
    await console.locator("#history .msg.from-bot").last.wait_for()
    shown = await wb.texts(shopper, f"{wb.W} .msg")
    assert not any("generous" in t for t in shown)  # notes never reach the shopper
    assert "Hi, I'm Mei from the shop. How can I help?" in shown
    assert problems(console) == []


async def test_chinese_console_overdue_filters_and_sign_out(
    impatient_svc: RunningService, browser: Browser
) -> None:
    svc = impatient_svc
    await add_agent(svc, "小美", "mei@shop.test", role="admin")
    await add_agent(svc, "Leo", "leo@shop.test")
    console = await open_console(browser, svc, locale="zh-CN")
    await console.locator("#signin-form h1", has_text="登录客服工作台").wait_for()
    await sign_in(console, "mei@shop.test")
    await console.locator("#desk").wait_for()

    # A shopper on the HTTP API asks for a person; the Waiting view shows it.
    r = await svc.post(contact_id="ann", contact_name="Ann", text="转人工")
    assert r.status_code == 202
    item = console.locator("#list .item")
    await item.wait_for()
    assert await item.locator(".name").inner_text() == "Ann"
    assert (await item.locator(".age").inner_text()).startswith("已等")
    assert await console.locator('[data-view="waiting"]').inner_text() == "等待人工 1"
    # Waiting past console.waiting_alert_seconds (1 s here): flagged the next time the list is
    # read — every 30 s, and at once on any change, such as another shopper writing.
    await asyncio.sleep(1.2)
    await svc.post(contact_id="bob", contact_name="Bob", text="Hello")
    ann = item.filter(has_text="Ann")
    await ann.locator(".flag", has_text="超时").wait_for()
    assert await ann.get_attribute("class") == "item overdue owner-handoff_requested"

    # The channel filter narrows the list; the view tabs move with the arrow keys.
    await console.locator("#f-channel").select_option("widget")
    await console.locator("#list-empty").wait_for()
    await console.locator("#f-channel").select_option("api")
    await ann.wait_for()
    await console.locator('[data-view="waiting"]').focus()
    await console.keyboard.press("ArrowRight")
    assert await console.locator('[data-view="mine"]').get_attribute("aria-selected") == "true"
    await console.locator("#list-empty", has_text="暂无会话").wait_for()
    await console.keyboard.press("ArrowRight")  # All open
    await ann.click()
    await console.locator("#c-owner", has_text="等待人工").wait_for()
    # Saved answers in the console's language, filled in for Ann: "/" and a shortcut...
    box = console.locator("#text")
    await box.focus()
    await console.keyboard.type("/he")
    picks = console.locator("#picker .pick")
    await picks.filter(has_text="Ann您好").wait_for()
    assert await picks.count() == 1
    await console.keyboard.press("Enter")
    assert await box.input_value() == "Ann您好，我是人工客服，正在为您处理。"
    # ...or the button, at the caret, and a click.
    await console.locator("#canned").click()
    await picks.filter(has_text="/order").wait_for()
    assert await picks.count() == 2
    await picks.filter(has_text="/order").click()
    assert await box.input_value() == "Ann您好，我是人工客服，正在为您处理。已为您查询订单 ："
    # What is written stays with its conversation: Bob's box is empty, Ann's keeps it.
    await item.filter(has_text="Bob").click()
    await console.locator("#c-name", has_text="Bob").wait_for()
    assert await box.input_value() == ""
    await ann.click()
    await console.locator("#c-name", has_text="Ann").wait_for()
    assert await box.input_value() == "Ann您好，我是人工客服，正在为您处理。已为您查询订单 ："
    # An admin hands it to a colleague, and may still resolve it.
    await console.locator("#assignee").select_option(label="Leo")
    await console.locator("#assign").click()
    await console.locator("#c-owner", has_text="Leo").wait_for()
    await console.locator("#toast", has_text="已转给 Leo").wait_for()
    await console.locator('[data-act="resolve"]').click()
    await console.locator("#c-owner", has_text="已解决").wait_for()
    await console.locator("#hint", has_text="已解决").wait_for()

    # The switch in the header speaks English, and remembers it.
    await console.locator("#lang").click()
    assert await console.locator('[data-view="resolved"]').inner_text() == "Resolved"
    await console.reload()
    await console.locator('[data-view="resolved"]', has_text="Resolved").wait_for()
    await console.locator('[data-view="resolved"]').click()
    await console.locator("#list .item .name", has_text="Ann").wait_for()

    # A session that ended (here: the cookie is gone) brings back the sign-in form, in words.
    cookies = await console.context.cookies()
    await console.context.clear_cookies()
    await console.locator('[data-view="open"]').click()
    await console.locator("#signin-error", has_text="Your session has ended").wait_for()
    await console.context.add_cookies(cookies)  # type: ignore[arg-type]
    await console.reload()
    await console.locator("#desk").wait_for()

    await console.locator("#signout").click()
    await console.locator("#signin-form").wait_for()
    r2 = await console.context.request.get(f"{svc.base_url}/api/v1/agent/session")
    assert r2.status == 401  # the session is gone, not only hidden
    assert problems(console) == []


async def test_console_page_headers(svc: RunningService) -> None:
    async with httpx.AsyncClient(base_url=svc.base_url) as client:
        page = await client.get("/console")
        assert page.status_code == 200
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["X-Frame-Options"] == "DENY"
        # The page names its files with their content hash: those may be cached for good.
        [js] = [p for p in page.text.split('"') if p.startswith("/console/static/console.js?v=")]
        versioned = await client.get(js)
        assert versioned.status_code == 200
        assert "immutable" in versioned.headers["Cache-Control"]
        assert versioned.headers["Content-Type"].startswith("application/javascript")
        plain = await client.get("/console/static/console.js")
        assert plain.headers["Cache-Control"] == "no-cache"
        again = await client.get(js, headers={"If-None-Match": versioned.headers["ETag"]})
        assert again.status_code == 304
        missing = await client.get("/console/static/../app.py")
        assert missing.status_code == 404
        unknown = await client.get("/console/static/other.js")
        assert unknown.status_code == 404
        # Nothing of the console's data without signing in.
        r = await client.get("/api/v1/agent/conversations")
        assert r.status_code == 401


async def test_suggested_reply_saved_answers_rating_and_report(
    csat_svc: RunningService, browser: Browser, shop: ShopServer
) -> None:
    svc = csat_svc
    await add_agent(svc, "Mei", "mei@shop.test")
    console = await open_console(browser, svc, locale="en-GB")
    await sign_in(console, "mei@shop.test")
    await console.locator("#live", has_text="Live").wait_for()

    who = f'data-user-id="u-42" data-user-hash="{sign(SECRET, "u-42")}" data-user-name="Ann Li"'
    shopper = await wb.open_page(browser, shop.url(attrs=who))
    await wb.open_chat(shopper)
    await wb.ask(shopper, "I want to talk to a human about my order ORD-1001")
    item = console.locator("#list .item")
    await item.wait_for()
    await console.locator("#list").focus()
    await console.keyboard.press("j")
    await console.locator('[data-act="claim"]').click()
    await console.locator("#c-owner", has_text="You").wait_for()
    await wb.ask(shopper, "Where is my order ORD-1001?")
    await console.locator("#history .msg.from-contact", has_text="Where is my order").wait_for()

    # Suggest (the key s, from the list): the bot's draft lands in the reply box, unsent.
    await console.keyboard.press("Escape")
    await console.keyboard.press("s")
    box = console.locator("#text")
    await console.locator("#toast", has_text="The bot’s draft is in the box").wait_for()
    draft = await box.input_value()
    assert draft.strip()
    assert await console.evaluate("document.activeElement.id") == "text"
    assert await console.locator("#history .msg.from-agent").count() == 0
    assert await shopper.locator(f"{wb.W} .msg.from-agent").count() == 0

    # Saved answers: "/" at the start of the box opens the picker, filled in for Ann.
    await box.fill("")
    await console.keyboard.type("/")
    picks = console.locator("#picker .pick")
    await picks.filter(has_text="/hello").wait_for()
    assert await picks.all_inner_texts() == [
        "/hello\nHi Ann Li, this is the support team. I'm looking into it now.",
        "/order\nI've checked order ORD-1001; here is what I found:",
    ]
    assert await picks.first.get_attribute("aria-selected") == "true"
    await console.keyboard.press("ArrowDown")  # arrow keys choose...
    assert await picks.nth(1).get_attribute("aria-selected") == "true"
    await console.keyboard.press("ArrowDown")  # ...round and round
    assert await picks.first.get_attribute("aria-selected") == "true"
    await console.keyboard.type("or")  # typing narrows it
    await console.locator("#picker .pick").filter(has_text="/hello").wait_for(state="detached")
    assert await picks.count() == 1
    await console.screenshot(path=wb.shot("console-saved-answers.png"))
    await console.keyboard.press("Enter")  # ...and Enter puts the text in the box
    assert await console.locator("#picker").is_hidden()
    filled = "I've checked order ORD-1001; here is what I found: "
    assert await box.input_value() == filled
    await console.keyboard.type("it is on its way.")
    await console.keyboard.type(" /nothing")  # a "/" later in the text is only a slash
    assert await console.locator("#picker").is_hidden()
    await console.keyboard.press("Control+a")
    await console.keyboard.type("/zz")
    await console.locator("#picker-note", has_text="No saved answer starts with /zz").wait_for()
    await console.keyboard.press("Escape")  # closes the picker, leaves the text
    assert await console.locator("#picker").is_hidden()
    assert await console.evaluate("document.activeElement.id") == "text"
    await box.fill(filled + "it is on its way.")
    await console.keyboard.press("Control+Enter")
    sent = shopper.locator(f"{wb.W} .msg.from-agent .text")
    await sent.wait_for()
    assert await sent.inner_text() == filled + "it is on its way."

    # Resolved: the widget asks for a rating; the shopper's "5" shows as stars.
    await console.locator('[data-act="resolve"]').click()
    await console.locator("#c-owner", has_text="Resolved").wait_for()
    question = shopper.locator(f"{wb.W} .msg", has_text="Reply 1 (poor) to 5")
    await question.wait_for()
    assert await console.locator("#c-rating").is_hidden()
    await wb.ask(shopper, "5")
    rating = console.locator("#c-rating")
    await rating.filter(has_text="★★★★★").wait_for()
    assert await rating.get_attribute("aria-label") == "Rated 5 of 5 by the shopper"
    assert await console.locator("#c-owner").inner_text() == "Resolved"
    await console.locator('[data-view="resolved"]').click()
    await item.locator(".stars", has_text="★★★★★").wait_for()
    assert await item.locator(".name").inner_text() == "Ann Li"

    # The report: per day and channel.
    await console.locator('#pages [data-page="report"]').click()
    await console.locator("#report").wait_for()
    assert await console.locator("#desk").is_hidden()
    assert await console.evaluate("document.activeElement.id") == "r-title"
    row = console.locator("#r-body tr")
    await row.first.wait_for()
    assert await row.count() == 1
    cells = [c.strip() for c in await row.locator("th, td").all_inner_texts()]
    day, channel, conversations, alone, reasons, p50, p90, satisfaction = cells
    assert re.fullmatch(r"[A-Z][a-z]{2} \d{1,2} [A-Z][a-z]{2}", day)  # e.g. Thu 3 Dec (UTC)
    assert (channel, conversations, alone) == ("Web chat", "1", "0% (0)")
    assert reasons == "asked for a person / upset 1"  # the router heard "talk to a human"
    assert p50 != "—" and p90 != "—"  # Mei answered: a time to the first human reply
    assert satisfaction == "5.0 ★ (1 rating)"
    totals = await console.locator("#r-totals").inner_text()
    assert totals == "1 conversation · 0% by the bot alone · 1 handed to a person · " + (
        "satisfaction 5.0 ★ (1 rating)"
    )
    await console.locator("#r-days").select_option("30")
    await console.locator("#r-days").focus()
    await console.locator("#toast").wait_for(state="hidden")  # (a clean screenshot)
    await console.screenshot(path=wb.shot("console-report.png"))
    # In Chinese, and back to the inbox by the header link.
    await console.locator("#lang").click()
    await console.locator("#r-title", has_text="客服报表").wait_for()
    assert await row.locator("td.chan").inner_text() == "网页聊天"
    await console.locator('#pages [data-page="inbox"]').click()
    await console.locator("#desk").wait_for()
    assert await console.locator("#report").is_hidden()
    assert problems(console) == []
