"""Complete messages to a chat: split to Telegram's length, formatted, 429-safe."""

from __future__ import annotations

import structlog
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramMigrateToChat,
)
from aiogram.methods import DeleteMessage, EditMessageText, SendMessage
from aiogram.types import LinkPreviewOptions, Message, ReplyParameters

from channels.base import Delivery
from channels.telegram.client import BotClient
from channels.telegram.text import Rendered, plain, render, split_text

log = structlog.get_logger(__name__)

# Bad requests that mean the chat will not take messages from us any more.
_GONE = ("chat not found", "user is deactivated", "bot was kicked", "have no rights to send")
_NO_PREVIEW = LinkPreviewOptions(is_disabled=True)


async def send_text(
    client: BotClient,
    chat_id: int,
    text: str,
    *,
    reply_to: int | None = None,
    sent: list[int] | None = None,
) -> list[int]:
    """Send `text` as one message per 4,096-character piece; returns their message ids
    (also appended to `sent` as they go out, so a failure half-way knows what did)."""
    ids: list[int] = sent if sent is not None else []
    for i, piece in enumerate(split_text(text)):
        rendered = render(piece, client.settings.parse_mode)
        msg = await send_piece(client, chat_id, piece, rendered, reply_to if i == 0 else None)
        ids.append(msg.message_id)
    return ids


async def send_piece(
    client: BotClient, chat_id: int, piece: str, rendered: Rendered, reply_to: int | None
) -> Message:
    reply = (
        ReplyParameters(message_id=reply_to, allow_sending_without_reply=True) if reply_to else None
    )

    def method(r: Rendered) -> SendMessage:
        return SendMessage(
            chat_id=chat_id,
            text=r.text,
            parse_mode=r.parse_mode,
            reply_parameters=reply,
            link_preview_options=_NO_PREVIEW,
        )

    try:
        return await client.call(method(rendered), chat_id, idempotent=False)
    except TelegramBadRequest as e:
        if not (rendered.formatted and _entity_error(e)):
            raise
        # Our formatting was refused: the words matter more than the bold.
        log.warning("telegram_format_refused", account=client.account, detail=e.message)
        return await client.call(
            method(Rendered(plain(piece), None, False)), chat_id, idempotent=False
        )


async def edit_piece(
    client: BotClient,
    chat_id: int,
    message_id: int,
    piece: str,
    rendered: Rendered,
    *,
    retries: int = 5,
) -> None:
    def method(r: Rendered) -> EditMessageText:
        return EditMessageText(
            chat_id=chat_id,
            message_id=message_id,
            text=r.text,
            parse_mode=r.parse_mode,
            link_preview_options=_NO_PREVIEW,
        )

    try:
        await client.call(method(rendered), chat_id, retries=retries)
    except TelegramBadRequest as e:
        if _not_modified(e):
            return  # it shows exactly this already
        if not (rendered.formatted and _entity_error(e)):
            raise
        log.warning("telegram_format_refused", account=client.account, detail=e.message)
        try:
            await client.call(method(Rendered(plain(piece), None, False)), chat_id)
        except TelegramBadRequest as e2:
            if not _not_modified(e2):
                raise


def _not_modified(e: TelegramBadRequest) -> bool:
    return "not modified" in e.message.lower()


async def delete_message(client: BotClient, chat_id: int, message_id: int) -> None:
    try:
        await client.call(DeleteMessage(chat_id=chat_id, message_id=message_id), chat_id)
    except TelegramAPIError as e:
        log.info("telegram_delete_failed", account=client.account, detail=str(e))


def _entity_error(e: TelegramBadRequest) -> bool:
    msg = e.message.lower()
    return "parse entities" in msg or "entity" in msg


def failed(e: Exception, sent: list[int] | None = None) -> Delivery:
    """What a send that raised `e` delivered (the pieces in `sent` did go out)."""
    ids = [str(i) for i in sent or []]
    if isinstance(e, TelegramForbiddenError):
        return Delivery(ids, ok=False, undeliverable=True, detail=f"telegram: {e.message}")
    if isinstance(e, TelegramMigrateToChat):
        return Delivery(
            ids,
            ok=False,
            undeliverable=True,
            detail=f"telegram: the group moved to chat {e.migrate_to_chat_id}",
        )
    if isinstance(e, TelegramBadRequest) and any(g in e.message.lower() for g in _GONE):
        return Delivery(ids, ok=False, undeliverable=True, detail=f"telegram: {e.message}")
    detail = e.message if isinstance(e, TelegramAPIError) else repr(e)
    return Delivery(ids, ok=False, detail=f"telegram: {detail}")
