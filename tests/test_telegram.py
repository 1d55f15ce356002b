"""The Telegram channel end to end: Updates posted to the webhook, answered through the real
aiogram client against the fake Bot API server (simulator/fakes/telegram_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from bot.settings import Settings
from channels.telegram.text import utf16_len
from simulator.fakes.telegram_api import FakeBotApi, StoredMessage, UpdateFactory
from storage.models import Conversation, Message
from tests.support import RunningService, eventually, start_service

TOKEN = "123456:TEST-token_abc"
BOT_ID = 123456
USERNAME = "shop_test_bot"
SECRET = "test-secret_1"
PATH = "/telegram/default/webhook"
SLOW = "[[sim:tokens=40,tps=30]]"  # about 1.3 s of streaming: several drafts


@dataclass
class Tg:
    svc: RunningService
    api: FakeBotApi
    updates: UpdateFactory

    async def post(
        self, update: dict[str, Any] | bytes, *, secret: str | None = SECRET
    ) -> httpx.Response:
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
        if isinstance(update, bytes):
            headers["Content-Type"] = "application/json"
            return await self.svc.client.post(PATH, content=update, headers=headers)
        return await self.svc.client.post(PATH, json=update, headers=headers)

    async def stored(self, chat_id: int) -> list[Message]:
        """Every stored message of this chat (all its conversations), in order."""
        async with self.svc.services.sessions() as s:
            rows = await s.execute(
                select(Message)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.channel == "telegram", Conversation.chat_id == str(chat_id))
                .order_by(Message.id)
            )
            return list(rows.scalars())

    async def conversation(self, chat_id: int) -> Conversation:
        async with self.svc.services.sessions() as s:
            rows = await s.execute(select(Conversation).where(Conversation.chat_id == str(chat_id)))
            return rows.scalars().one()

    async def answers(self, chat_id: int, count: int = 1) -> list[Message]:
        """Wait until `count` bot answers of the chat are stored and delivered."""

        async def probe() -> list[Message] | None:
            done = [
                m for m in await self.stored(chat_id) if m.sender == "bot" and m.status == "sent"
            ]
            return done if len(done) >= count else None

        return await eventually(probe)

    async def visible(self, chat_id: int, count: int = 1) -> list[StoredMessage]:
        async def probe() -> list[StoredMessage] | None:
            shown = self.api.sent(chat_id)
            return shown if len(shown) >= count else None

        return await eventually(probe)


def bot_config(base_url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "bots": [{"account": "default", "api_base_url": base_url, **overrides}],
    }


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi(usernames={TOKEN: USERNAME})
    await api.start()
    yield api
    await api.stop()


TgFactory = Callable[..., Awaitable[Tg]]


@pytest.fixture
async def tg_factory(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    fake_api: FakeBotApi,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[TgFactory]:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", SECRET)
    started: list[RunningService] = []

    async def factory(
        bot: dict[str, Any] | None = None, section: dict[str, Any] | None = None, **overrides: Any
    ) -> Tg:
        telegram = {**bot_config(fake_api.base_url or "", **(bot or {})), **(section or {})}
        overrides.setdefault("channels", {})["telegram"] = telegram
        svc = await start_service(settings_factory(sqlite_url, **overrides))
        started.append(svc)
        return Tg(svc, fake_api, UpdateFactory(BOT_ID, USERNAME))

    yield factory
    for svc in started:
        await svc.stop()


@pytest.fixture
async def tg(tg_factory: TgFactory) -> Tg:
    return await tg_factory()


# --- private chats: drafts, then one final ------------------------------------------------


async def test_private_update_streams_drafts_then_one_final_message(tg: Tg) -> None:
    chat = 5001
    r = await tg.post(tg.updates.text(chat, f"Where is my parcel? {SLOW}"))
    assert r.status_code == 200 and r.json() == {}
    # Stored before Telegram got its 200.
    inbound = (await tg.stored(chat))[0]
    assert (inbound.external_id, inbound.kind, inbound.direction) == (f"{chat}:1", "text", "in")

    answer = (await tg.answers(chat))[0]
    shown = await tg.visible(chat)
    assert len(shown) == 1, "one final message"
    assert shown[0].text == answer.text
    assert answer.platform_message_ids == [str(shown[0].message_id)]

    calls = tg.api.calls_to(chat)
    methods = [c.method for c in calls]
    assert methods[0] == "sendchataction" and calls[0].params["action"] == "typing"
    drafts = tg.api.drafts_to(chat)
    assert len(drafts) >= 2, "the answer streams in several drafts"
    deltas = 40
    assert len(drafts) < deltas / 2, "drafts are throttled, not one per token"
    texts = [d.text for d in drafts]
    assert all(answer.text.startswith(t) for t in texts), "plain prefixes of the answer"
    assert len(set(texts)) == len(texts), "unchanged text is not sent again"
    assert len({d.params["draft_id"] for d in drafts}) == 1
    assert methods.index("sendmessagedraft") < methods.index("sendmessage")
    assert methods.count("sendmessage") == 1 and "editmessagetext" not in methods
    assert "parse_mode" not in drafts[0].params
    assert not tg.api.violations


async def test_drafts_unavailable_falls_back_to_edits(tg_factory: TgFactory) -> None:
    tg = await tg_factory()
    tg.api.drafts = False  # an older Bot API server: sendMessageDraft is 404
    chat = 5002
    await tg.post(tg.updates.text(chat, f"Can I return shoes? {SLOW}"))
    answer = (await tg.answers(chat))[0]
    shown = await tg.visible(chat)
    assert [m.text for m in shown] == [answer.text]
    methods = [c.method for c in tg.api.calls_to(chat)]
    assert methods.count("sendmessage") == 1 and "editmessagetext" in methods
    assert answer.platform_message_ids == [str(shown[0].message_id)]
    # The next answer does not try drafts again.
    await tg.post(tg.updates.text(chat, "thanks"))
    await tg.answers(chat, 2)
    assert [c.method for c in tg.api.calls_to(chat)].count("sendmessagedraft") == 1


# --- groups -------------------------------------------------------------------------------


async def test_group_answers_only_when_mentioned_or_replied_to(tg: Tg) -> None:
    group = -100500
    ignored = tg.updates.message(group, user_id=71, text="anyone here tried the blue kettle?")
    assert (await tg.post(ignored)).status_code == 200
    asked = tg.updates.mention(group, 72, f"is the blue kettle back in stock? {SLOW}")
    assert (await tg.post(asked)).status_code == 200

    answer = (await tg.answers(group))[0]
    shown = await tg.visible(group)
    assert [m.text for m in shown] == [answer.text]
    assert shown[0].reply_to == asked["message"]["message_id"], "it answers the one who asked"
    methods = [c.method for c in tg.api.calls_to(group)]
    assert "sendmessagedraft" not in methods, "no drafts in groups"
    assert "editmessagetext" in methods, "groups stream by editing one message"

    stored = await tg.stored(group)
    by_text = {m.text: m for m in stored if m.direction == "in"}
    assert by_text["anyone here tried the blue kettle?"].status == "skipped"
    assert f"is the blue kettle back in stock? {SLOW}" in by_text, "the @mention is removed"

    # A reply to the bot is for the bot too; the unaddressed message still got no answer.
    await tg.post(tg.updates.message(group, user_id=71, text="and the red one?", reply_to_bot=True))
    await tg.answers(group, 2)
    assert len(tg.api.sent(group)) == 2
    assert not tg.api.violations


async def test_group_replies_never(tg_factory: TgFactory) -> None:
    tg = await tg_factory({"group_replies": "never"})
    group = -100600
    await tg.post(tg.updates.mention(group, 5, "hello?"))
    await tg.post(tg.updates.text(6001, "and in private?"))
    await tg.answers(6001)
    assert tg.api.calls_to(group) == []
    assert [m.status for m in await tg.stored(group)] == ["skipped"]


# --- idempotency and edits ----------------------------------------------------------------


async def test_redelivered_update_is_answered_once(tg: Tg) -> None:
    chat = 5003
    update = tg.updates.text(chat, "Do you ship to Lyon?")
    first = await tg.post(update)
    again = await asyncio.gather(*(tg.post(update) for _ in range(4)))
    assert first.status_code == 200 and all(r.status_code == 200 for r in again)
    # Telegram may also resend it under a new update_id (after a restart on its side).
    await tg.post({**update, "update_id": update["update_id"] + 500})
    await tg.answers(chat)
    # A later question proves nothing else was queued for the first one.
    await tg.post(tg.updates.text(chat, "And to Nice?"))
    await tg.answers(chat, 2)
    stored = await tg.stored(chat)
    assert [(m.direction, m.sender) for m in stored] == [
        ("in", "contact"),
        ("out", "bot"),
        ("in", "contact"),
        ("out", "bot"),
    ]
    assert len(tg.api.sent(chat)) == 2


async def test_edited_message_updates_the_stored_text_without_a_new_answer(tg: Tg) -> None:
    chat = 5004
    original = tg.updates.text(chat, "Where is my order 1234?")
    await tg.post(original)
    await tg.answers(chat)
    edit = tg.updates.edit(original, "Where is my order 1235?")
    assert (await tg.post(edit)).status_code == 200
    assert (await tg.post(edit)).status_code == 200  # redelivered edit: applied once

    first = (await tg.stored(chat))[0]
    assert first.text == "Where is my order 1235?"
    assert [e["previous_text"] for e in first.raw["edits"]] == ["Where is my order 1234?"]

    await tg.post(tg.updates.text(chat, "ok thanks"))
    await tg.answers(chat, 2)
    stored = await tg.stored(chat)
    assert sum(1 for m in stored if m.sender == "bot") == 2, "the edit got no answer"


# --- long answers, rate limits ------------------------------------------------------------


async def test_long_answer_is_split_at_sentence_boundaries(tg_factory: TgFactory) -> None:
    tg = await tg_factory(reply={"max_output_tokens": 4000})
    chat = 5005
    await tg.post(tg.updates.text(chat, "Tell me everything [[sim:tokens=2000,tps=20000]]"))
    answer = (await tg.answers(chat))[0]
    assert utf16_len(answer.text) > 4096
    shown = await tg.visible(chat, 2)
    assert len(shown) >= 2
    assert all(utf16_len(m.text) <= 4096 for m in shown)
    assert all(m.text.rstrip()[-1] in ".!?…" for m in shown[:-1]), "cut after a sentence"
    assert " ".join(m.text for m in shown).split() == answer.text.split(), "nothing lost"
    assert answer.platform_message_ids == [str(m.message_id) for m in shown]


async def test_retry_after_pauses_the_chat_and_the_final_arrives_once(tg: Tg) -> None:
    chat = 5006
    tg.api.fail_next("sendMessage", chat_id=chat, retry_after=1)
    tg.api.fail_next("sendMessageDraft", chat_id=chat, retry_after=1)
    await tg.post(tg.updates.text(chat, f"Is the jacket available in M? {SLOW}"))
    answer = (await tg.answers(chat))[0]
    shown = await tg.visible(chat)
    assert [m.text for m in shown] == [answer.text]
    sends = tg.api.calls_to(chat, "sendMessage")
    assert [c.status for c in sends] == [429, 200]
    assert not tg.api.violations, "nothing was sent to the chat while it was paused"


async def test_flood_limits_are_honoured_with_a_fast_draft_rate(tg_factory: TgFactory) -> None:
    tg = await tg_factory({"draft_updates_per_second": 20})
    tg.api.per_chat_per_second = 3
    chat = 5007
    await tg.post(tg.updates.text(chat, "What's your warranty? [[sim:tokens=60,tps=40]]"))
    answer = (await tg.answers(chat))[0]
    assert [m.text for m in tg.api.sent(chat)] == [answer.text]
    statuses = [c.status for c in tg.api.calls_to(chat)]
    assert 429 in statuses, "the fake flood limit was hit"
    assert not tg.api.violations, "after a 429 the chat waited retry_after"


async def test_blocked_bot_marks_the_answer_undeliverable_and_calls_a_person(tg: Tg) -> None:
    chat = 5016
    tg.api.fail_next(
        "sendMessage",
        chat_id=chat,
        status=403,
        description="Forbidden: bot was blocked by the user",
    )
    await tg.post(tg.updates.text(chat, "hello?"))

    async def undeliverable() -> Message | None:
        out = [m for m in await tg.stored(chat) if m.sender == "bot"]
        return out[0] if out and out[0].status == "undeliverable" else None

    await eventually(undeliverable)
    assert (await tg.conversation(chat)).owner == "handoff_requested"
    assert tg.api.sent(chat) == []


# --- bad input ----------------------------------------------------------------------------


async def test_bad_secret_garbage_and_oversized_bodies_are_refused(
    tg_factory: TgFactory,
) -> None:
    tg = await tg_factory(server={"max_body_bytes": 4096})
    chat = 5008
    update = tg.updates.text(chat, "hello")

    async def refused(resp: httpx.Response, status: int, code: str) -> None:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"] == code and resp.json()["detail"]

    await refused(await tg.post(update, secret="wrong"), 401, "unauthorized")
    await refused(await tg.post(update, secret=None), 401, "unauthorized")
    await refused(await tg.post(b"{not json"), 400, "invalid_json")
    await refused(await tg.post(b"[1, 2]"), 400, "invalid_json")
    await refused(await tg.post({"message": update["message"]}), 400, "invalid_update")
    big = tg.updates.text(chat, "x" * 5000)
    await refused(await tg.post(big), 413, "body_too_large")
    assert await tg.stored(chat) == []
    # The service keeps serving.
    assert (await tg.post(update)).status_code == 200
    await tg.answers(chat)


async def test_unhandled_update_types_are_acknowledged_and_counted(tg: Tg) -> None:
    callback = tg.updates.other(
        callback_query={
            "id": "cb1",
            "from": {"id": 9, "is_bot": False, "first_name": "A"},
            "chat_instance": "x",
            "data": "yes",
        }
    )
    future = tg.updates.other(some_update_from_2030={"anything": 1})
    unreadable = tg.updates.other(message={"message_id": "not a number"})
    for u in (callback, future, unreadable):
        assert (await tg.post(u)).status_code == 200
    metrics = (await tg.svc.client.get("/metrics")).text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("swarmdesk_telegram_updates_total{")
    ]
    for kind, outcome in (
        ("callback_query", "unhandled"),
        ("unknown", "unhandled"),
        ("unknown", "invalid"),
    ):
        assert any(f'type="{kind}"' in c and f'outcome="{outcome}"' in c for c in counted)
    await tg.post(tg.updates.text(5009, "still there?"))
    await tg.answers(5009)


# --- commands and media -------------------------------------------------------------------


async def test_start_help_and_human(tg: Tg) -> None:
    chat = 5010
    welcome = tg.svc.services.settings.channels.telegram.bots[0].texts
    await tg.post(tg.updates.text(chat, "/start"))
    await tg.post(tg.updates.text(chat, "/help"))
    shown = await tg.visible(chat, 2)
    assert {m.text for m in shown} == {welcome.welcome, welcome.help}

    await tg.post(tg.updates.text(chat, "/human"))
    shown = await tg.visible(chat, 3)
    assert shown[-1].text == welcome.human
    assert (await tg.conversation(chat)).owner == "handoff_requested"

    # A person owns it now: the bot stays quiet.
    await tg.post(tg.updates.text(chat, "hello?"))
    stored = await eventually(
        lambda: _last_status(tg, chat, "human"),
    )
    assert stored
    assert len(tg.api.sent(chat)) == 3
    senders = [(m.kind, m.sender) for m in await tg.stored(chat)]
    assert senders.count(("command", "contact")) == 3
    assert senders.count(("text", "system")) == 3
    assert not any(sender == "bot" for _, sender in senders)


async def _last_status(tg: Tg, chat: int, status: str) -> bool:
    stored = await tg.stored(chat)
    return bool(stored) and stored[-1].status == status


async def test_voice_and_sticker_are_stored_and_get_the_configured_reply(tg: Tg) -> None:
    chat = 5011
    texts = tg.svc.services.settings.channels.telegram.bots[0].texts
    await tg.post(tg.updates.voice(chat))
    await tg.post(tg.updates.sticker(chat))
    shown = await tg.visible(chat, 2)
    assert [m.text for m in shown] == [texts.unreadable, texts.unreadable]
    stored = await tg.stored(chat)
    inbound = [m for m in stored if m.direction == "in"]
    assert [m.kind for m in inbound] == ["voice", "sticker"]
    assert inbound[0].attachments[0]["file_id"] == "voice-1"
    assert inbound[1].attachments[0]["emoji"] == "👍"
    assert not any(m.sender == "bot" for m in stored)


async def test_voice_hands_off_when_configured(tg_factory: TgFactory) -> None:
    tg = await tg_factory({"unreadable_media": "handoff"})
    chat = 5012
    await tg.post(tg.updates.voice(chat))
    shown = await tg.visible(chat)
    assert (
        shown[0].text == tg.svc.services.settings.channels.telegram.bots[0].texts.unreadable_handoff
    )
    assert (await tg.conversation(chat)).owner == "handoff_requested"


async def test_photo_caption_is_the_question(tg: Tg) -> None:
    chat = 5013
    await tg.post(tg.updates.photo(chat, caption="Is this the right size?"))
    answer = (await tg.answers(chat))[0]
    inbound = (await tg.stored(chat))[0]
    assert (inbound.kind, inbound.text) == ("image", "Is this the right size?")
    assert inbound.attachments[0]["file_id"] == "p-big"
    assert [m.text for m in await tg.visible(chat)] == [answer.text]


# --- agents and system messages -----------------------------------------------------------


async def test_agent_message_is_formatted_escaped_and_split(tg: Tg) -> None:
    chat = 5014
    await tg.post(tg.updates.text(chat, "/start"))
    await tg.visible(chat)
    conv = await tg.conversation(chat)
    text = "Your order **#12 <A&B>** ships *today*.\n\n" + ("More details follow. " * 250)
    msg = await tg.svc.services.host.send_message(conv.id, text, sender="agent")
    assert msg.status == "sent"
    shown = (await tg.visible(chat, 3))[1:]
    assert len(shown) == 2 and all(utf16_len(m.text) <= 4096 for m in shown)
    first = shown[0]
    assert first.parse_mode == "HTML"
    assert first.text.startswith("Your order #12 <A&B> ships today.")
    assert ("b", 11, 9) in first.entities and ("i", 27, 5) in first.entities
    assert msg.platform_message_ids == [str(m.message_id) for m in shown]


# --- long polling -------------------------------------------------------------------------


async def test_polling_mode_answers_updates_from_get_updates(
    tg_factory: TgFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET")  # polling needs no webhook secret
    tg = await tg_factory(section={"mode": "polling"})
    chat = 5015
    tg.api.push_update(TOKEN, tg.updates.text(chat, "hello from polling"))
    answer = (await tg.answers(chat))[0]
    assert [m.text for m in await tg.visible(chat)] == [answer.text]
    assert any(c.method == "deletewebhook" for c in tg.api.calls)


# --- a person takes over: the bot stops sending at once ------------------------------------


async def test_claim_while_the_final_waits_out_a_429_sends_nothing_of_the_bot(tg: Tg) -> None:
    from tests.test_agents_console import Console, _agent

    chat = 5101
    await _agent(tg.svc, "mia")
    mia = Console(tg.svc, "mia")
    try:
        await mia.sign_in()
        tg.api.fail_next("sendMessage", chat_id=chat, retry_after=2)
        await tg.post(tg.updates.text(chat, "Is the jacket available in M?"))

        async def paused() -> bool:
            return any(c.status == 429 for c in tg.api.calls_to(chat, "sendMessage"))

        await eventually(paused)  # the final answer waits for the chat to open again
        cid = (await tg.conversation(chat)).id
        assert (await mia.post(f"/conversations/{cid}/claim")).status_code == 200

        async def settled() -> list[Message] | None:
            bot = [m for m in await tg.stored(chat) if m.sender == "bot"]
            return bot if bot and bot[0].status not in ("streaming", "pending") else None

        assert [m.status for m in await eventually(settled)] == ["abandoned"]
        actions_before = len(tg.api.calls_to(chat, "sendChatAction"))
        assert (await mia.post(f"/conversations/{cid}/typing")).status_code == 200
        assert len(tg.api.calls_to(chat, "sendChatAction")) == actions_before + 1
        r = await mia.post(f"/conversations/{cid}/reply", {"text": "Hi, Mia here."})
        assert r.status_code == 200
        shown = await tg.visible(chat)
        assert [m.text for m in shown] == ["Hi, Mia here."], "only the person's message"
        # Handed back, the bot answers the next message again.
        assert (await mia.post(f"/conversations/{cid}/handback")).status_code == 200
        await tg.post(tg.updates.text(chat, "Thanks! And the blue one?"))
        await tg.answers(chat)
        assert len(await tg.visible(chat, 2)) == 2
    finally:
        await mia.close()


async def test_claim_during_streaming_stops_the_drafts(tg: Tg) -> None:
    from tests.test_agents_console import Console, _agent

    chat = 5102
    await _agent(tg.svc, "mia")
    mia = Console(tg.svc, "mia")
    try:
        await mia.sign_in()
        await tg.post(tg.updates.text(chat, "Where is my parcel? [[sim:tokens=60,tps=10]]"))

        async def drafting() -> bool:
            return len(tg.api.drafts_to(chat)) >= 1

        await eventually(drafting)
        cid = (await tg.conversation(chat)).id
        assert (await mia.post(f"/conversations/{cid}/claim")).status_code == 200

        async def settled() -> list[Message] | None:
            bot = [m for m in await tg.stored(chat) if m.sender == "bot"]
            return bot if bot and bot[0].status != "streaming" else None

        assert [m.status for m in await eventually(settled)] == ["abandoned"]
        drafts_then = len(tg.api.drafts_to(chat))
        await asyncio.sleep(1.5)  # what the bot would have streamed meanwhile
        assert len(tg.api.drafts_to(chat)) <= drafts_then + 1  # one may have been in flight
        assert tg.api.sent(chat) == []
    finally:
        await mia.close()
