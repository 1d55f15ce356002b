"""How a Telegram message is read: its kind, its text, commands, and whether it is for the bot."""

from __future__ import annotations

from typing import Any

from aiogram.types import Update

from channels.telegram.inbound import Incoming, classify, user_of
from simulator.fakes.telegram_api import UpdateFactory

BOT_ID, USERNAME = 123456, "shop_test_bot"
updates = UpdateFactory(BOT_ID, USERNAME)


def read(update: dict[str, Any], mode: str = "mention") -> Incoming | None:
    message = Update.model_validate(update).message
    assert message is not None
    return classify(message, bot_id=BOT_ID, username=USERNAME, group_replies=mode)  # type: ignore[arg-type]


def test_commands() -> None:
    assert (i := read(updates.text(1, "/start"))) and i.command == "start"
    assert (i := read(updates.text(1, f"/HELP@{USERNAME}"))) and i.command == "help"
    assert (i := read(updates.text(1, "/order 1234"))) and i.command is None and i.readable
    group = read(updates.message(-5, user_id=2, text="/human@other_bot"))
    assert group is not None and group.command is None and not group.addressed
    ours = read(updates.message(-5, user_id=2, text=f"/human@{USERNAME}"))
    assert ours is not None and ours.command == "human" and ours.addressed


def test_group_addressing() -> None:
    plain = updates.message(-5, user_id=2, text="hi all")
    assert read(plain).addressed is False  # type: ignore[union-attr]
    assert read(plain, "always").addressed is True  # type: ignore[union-attr]
    mention = read(updates.mention(-5, 2, "where is my order?"))
    assert mention is not None and mention.addressed and mention.text == "where is my order?"
    reply = read(updates.message(-5, user_id=2, text="and now?", reply_to_bot=True))
    assert reply is not None and reply.addressed
    never = read(updates.mention(-5, 2, "hello"), "never")
    assert never is not None and not never.addressed


def test_kinds() -> None:
    voice = read(updates.voice(1))
    assert voice is not None and voice.kind == "voice" and not voice.readable
    sticker = read(updates.sticker(1))
    assert sticker is not None and sticker.kind == "sticker" and not sticker.readable
    photo = read(updates.photo(1, caption="this one?"))
    assert photo is not None and (photo.kind, photo.text, photo.readable) == (
        "image",
        "this one?",
        True,
    )
    bare = read(updates.photo(1))
    assert bare is not None and bare.kind == "image" and not bare.readable
    joined = updates.message(
        -5, user_id=2, new_chat_members=[{"id": 3, "is_bot": False, "first_name": "C"}]
    )
    assert read(joined) is None, "service messages are not stored"


def test_anonymous_admin_is_the_group_not_the_bot() -> None:
    update = updates.message(-5, user_id=1087968824, text=f"@{USERNAME} hi")
    update["message"]["from"]["is_bot"] = True
    update["message"]["sender_chat"] = {"id": -5, "type": "supergroup", "title": "Shop fans"}
    message = Update.model_validate(update).message
    assert message is not None
    assert user_of(message) == ("chat-5", "Shop fans")
