"""What a Telegram message is to swarmdesk: its kind, its text, and whether it is for us."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from aiogram.types import Message

CHANNEL = "telegram"
COMMANDS = ("start", "help", "human")

# Content types whose caption is the question (the media itself is kept as an attachment).
_CAPTIONED = {
    "photo": "image",
    "document": "document",
    "video": "video",
    "animation": "animation",
    "audio": "audio",
}
# Content the bot cannot read yet: stored with its kind, answered per `unreadable_media`.
_UNREADABLE = {
    "voice": "voice",
    "video_note": "video_note",
    "sticker": "sticker",
    "location": "location",
    "venue": "location",
    "contact": "contact",
    "poll": "poll",
    "dice": "dice",
    "story": "story",
    "paid_media": "paid_media",
}


@dataclass(frozen=True, slots=True)
class Incoming:
    kind: str
    text: str
    attachments: list[dict[str, Any]] = field(default_factory=list)
    command: str | None = None  # start, help, human
    addressed: bool = True  # private, or mentioned / replied to / our command in a group

    @property
    def readable(self) -> bool:
        """Something the bot can answer: text, or the caption of a photo or file (a voice
        message's caption alone is not the question)."""
        return self.kind not in _UNREADABLE.values() and bool(self.text.strip())


def external_id(chat_id: int, message_id: int) -> str:
    """The idempotency key of a Telegram message: unique per chat on Telegram's side."""
    return f"{chat_id}:{message_id}"


def message_id_of(external: str | None) -> int | None:
    if not external:
        return None
    _, _, tail = external.rpartition(":")
    return int(tail) if tail.isdigit() else None


def user_of(message: Message) -> tuple[str, str | None]:
    """(platform user id, display name) of whoever wrote `message`."""
    if message.sender_chat is not None:  # an anonymous group admin, or a channel
        return f"chat{message.sender_chat.id}", message.sender_chat.title
    if message.from_user is not None:
        u = message.from_user
        name = u.full_name + (f" (@{u.username})" if u.username else "")
        return str(u.id), name
    return f"chat{message.chat.id}", None


def classify(
    message: Message,
    *,
    bot_id: int,
    username: str,
    group_replies: Literal["mention", "always", "never"],
) -> Incoming | None:
    """The message as swarmdesk sees it; None for service messages (joins, pins, ...)."""
    private = message.chat.type == "private"
    ctype = message.content_type
    content = str(getattr(ctype, "value", ctype))  # aiogram's ContentType is a str Enum
    text = message.text if message.text is not None else (message.caption or "")
    entities = (message.entities if message.text is not None else message.caption_entities) or []
    if content == "text":
        kind = "text"
    elif content in _CAPTIONED:
        kind = _CAPTIONED[content]
    elif content in _UNREADABLE:
        kind = _UNREADABLE[content]
    else:
        return None
    attachments = _attachments(message, content)

    command, command_target = None, None
    for e in entities:
        if e.type == "bot_command" and e.offset == 0:
            name, _, command_target = e.extract_from(text)[1:].partition("@")
            command = name.lower()
            break
    for_us = private or not command_target or command_target.lower() == username.lower()
    known_command = command if command in COMMANDS and for_us else None

    mentioned = _mentions(entities, text, bot_id=bot_id, username=username) or bool(
        command and command_target and for_us
    )
    replied = (
        message.reply_to_message is not None
        and message.reply_to_message.from_user is not None
        and message.reply_to_message.from_user.id == bot_id
    )
    if private:
        addressed = True
    elif group_replies == "never":
        addressed = False
    elif group_replies == "always":
        addressed = for_us
    else:
        addressed = mentioned or replied or bool(known_command)
    if username and not private:
        text = _strip_mention(text, username)
    return Incoming(kind, text, attachments, known_command, addressed)


def _mentions(entities: list[Any], text: str, *, bot_id: int, username: str) -> bool:
    for e in entities:
        if (
            e.type == "mention"
            and username
            and e.extract_from(text)[1:].lower() == username.lower()
        ):
            return True
        if e.type == "text_mention" and e.user is not None and e.user.id == bot_id:
            return True
    return False


def _strip_mention(text: str, username: str) -> str:
    stripped = re.sub(rf"@{re.escape(username)}\b", "", text, flags=re.IGNORECASE)
    return " ".join(stripped.split()) if stripped != text else text


def _attachments(message: Message, content: str) -> list[dict[str, Any]]:
    if content == "photo" and message.photo:
        p = message.photo[-1]  # the largest size
        return [_file("photo", p, width=p.width, height=p.height)]
    media = getattr(message, content, None)
    if media is None or not hasattr(media, "file_id"):
        if content in ("location", "venue") and message.location is not None:
            loc = message.location
            return [{"type": "location", "latitude": loc.latitude, "longitude": loc.longitude}]
        if content == "contact" and message.contact is not None:
            c = message.contact
            return [{"type": "contact", "phone_number": c.phone_number, "name": c.first_name}]
        return [{"type": content}]
    extra: dict[str, Any] = {}
    for key in ("file_name", "mime_type", "duration", "emoji", "set_name"):
        value = getattr(media, key, None)
        if value is not None:
            extra[key] = value
    return [_file(content, media, **extra)]


def _file(kind: str, media: Any, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "file_id": media.file_id}
    if getattr(media, "file_unique_id", None):
        out["file_unique_id"] = media.file_unique_id
    if getattr(media, "file_size", None):
        out["file_size"] = media.file_size
    out.update(extra)
    return out
