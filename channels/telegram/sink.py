"""The Telegram reply sink: how one answer appears in a chat while it is being written.

Private chats stream with `sendMessageDraft` (a live preview; Bot API 9.3+), throttled to
`draft_updates_per_second`, and finish with `sendMessage`. Groups, and bots or servers without
drafts, send a first message and `editMessageText` it at most every `edit_interval_seconds`,
then edit in the formatted final text. Streamed text is plain; only the final carries
formatting. Unchanged text is never sent again; a 429 pauses the whole chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import structlog
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNotFound,
    TelegramRetryAfter,
)
from aiogram.methods import SendChatAction, SendMessageDraft

from channels.base import Delivery, ReplySink, may_send
from channels.telegram.client import BotClient
from channels.telegram.outbound import delete_message, edit_piece, failed, send_piece, send_text
from channels.telegram.text import Rendered, plain, render, split_text

log = structlog.get_logger(__name__)

TYPING_REFRESH_S = 4.0  # Telegram shows "typing" for about 5 s per call
_STREAM_TIMEOUT_S = 5.0  # a streamed update that slow is skipped; the next one carries more


def draft_id_for(inbound_id: int, piece: int = 0) -> int:
    """A non-zero 31-bit draft id, distinct per answer and per 4,096-character piece."""
    return (inbound_id * 16) % (2**31 - 32) + 1 + piece


class TelegramSink(ReplySink):
    def __init__(
        self,
        client: BotClient,
        chat_id: int,
        *,
        private: bool,
        reply_to: int | None,
        inbound_id: int,
        tasks: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self._client = client
        # The channel's registry of background tasks: it cancels what is left at shutdown.
        self._tasks = tasks if tasks is not None else set()
        self._chat = chat_id
        self._gate = client.gate(chat_id)
        self._reply_to = reply_to
        self._inbound_id = inbound_id
        self._drafts = private and client.drafts_available
        self._text = ""  # everything pushed so far
        self._draft_shown: tuple[int, str] | None = None  # (piece, text) of the last draft
        self._messages: list[int] = []  # edit mode: the streamed messages, one per piece
        self._shown: list[str] = []  # edit mode: what each of them shows
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self._refused = False  # the chat refuses our messages (blocked bot, kicked)

    @property
    def _interval(self) -> float:
        s = self._client.settings
        return 1.0 / s.draft_updates_per_second if self._drafts else s.edit_interval_seconds

    # -- ReplySink -----------------------------------------------------------------------

    async def typing(self) -> None:
        if self._client.settings.typing and self._typing is None and not self._text:
            self._typing = self._spawn(self._keep_typing())

    async def push(self, delta: str) -> None:
        if not delta:
            return
        self._text += delta
        self._stop_typing()
        if self._flusher is None and not self._refused:
            self._flusher = self._spawn(self._flush_loop())
        self._wake.set()

    async def finish(self, final_text: str) -> Delivery:
        self._stop_typing()
        await self._stop_streaming()
        sent: list[int] = []
        try:
            if self._messages:
                await self._finish_edits(final_text, sent)
            else:
                await send_text(
                    self._client, self._chat, final_text, reply_to=self._reply_to, sent=sent
                )
        except Exception as e:
            log.warning(
                "telegram_delivery_failed",
                account=self._client.account,
                chat_id=self._chat,
                detail=str(e),
            )
            return failed(e, sent)
        return Delivery([str(i) for i in sent])

    async def fail(self, reason: str) -> None:
        self._stop_typing()
        await self._stop_streaming()
        # A draft fades by itself; streamed messages would stay: remove them.
        for message_id in self._messages:
            await delete_message(self._client, self._chat, message_id)
        self._messages.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- typing --------------------------------------------------------------------------

    async def _keep_typing(self) -> None:
        while may_send():
            try:
                await self._client.call(
                    SendChatAction(chat_id=self._chat, action="typing"),
                    self._chat,
                    retries=0,
                    timeout=_STREAM_TIMEOUT_S,
                )
            except TelegramForbiddenError:
                return
            except TelegramAPIError as e:
                log.debug("telegram_typing_failed", detail=str(e))
            await asyncio.sleep(TYPING_REFRESH_S)

    def _stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None

    # -- streaming -----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._stop.is_set():
                return
            interval = self._interval
            at = self._gate.reserve_stream_slot(interval)
            if (delay := at - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                self._gate.release_stream_slot(at, interval)  # the final may use it
                return  # the final message is on its way: no more previews
            self._wake.clear()
            if not may_send():
                return  # a person took over: no more previews of the bot's answer
            self._gate.stream_update_leaves(interval)
            try:
                await self._show(plain(self._text))
            except TelegramRetryAfter:
                self._wake.set()  # the chat is paused; show the newest text once it opens
            except TelegramForbiddenError:
                self._refused = True
                return
            except TelegramAPIError as e:
                log.info("telegram_stream_update_failed", chat_id=self._chat, detail=str(e))

    async def _stop_streaming(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            await self._flusher  # lets an update in flight complete: we must know its message
            self._flusher = None

    async def _show(self, text: str) -> None:
        pieces = split_text(text)
        if not pieces:
            return
        if self._drafts:
            try:
                await self._show_draft(pieces)
                return
            except (TelegramBadRequest, TelegramNotFound) as e:
                self._drafts_refused(e)
        await self._show_edits(pieces)

    async def _show_draft(self, pieces: list[str]) -> None:
        # A draft holds one message: past 4,096 characters it shows the piece being written.
        index, piece = len(pieces) - 1, pieces[-1]
        if self._draft_shown == (index, piece):
            return
        await self._client.call(
            SendMessageDraft(
                chat_id=self._chat,
                draft_id=draft_id_for(self._inbound_id, index),
                text=piece,
                parse_mode=None,
            ),
            self._chat,
            retries=0,
            timeout=_STREAM_TIMEOUT_S,
        )
        self._draft_shown = (index, piece)

    def _drafts_refused(self, e: TelegramAPIError) -> None:
        self._drafts = False
        if isinstance(e, TelegramNotFound) and self._client.drafts_available:
            # The Bot API server does not know the method: stop trying it for this bot.
            self._client.drafts_available = False
            log.warning(
                "telegram_drafts_unavailable",
                account=self._client.account,
                detail=f"{e.message}; streaming by message edits instead (set drafts: false "
                "to skip the attempt)",
            )
        else:
            log.info("telegram_draft_refused", chat_id=self._chat, detail=e.message)

    async def _show_edits(self, pieces: list[str]) -> None:
        for i, piece in enumerate(pieces):
            if i < len(self._messages):
                if self._shown[i] != piece:
                    await edit_piece(
                        self._client,
                        self._chat,
                        self._messages[i],
                        piece,
                        Rendered(piece, None, False),
                        retries=0,
                    )
                    self._shown[i] = piece
            else:
                msg = await send_piece(
                    self._client,
                    self._chat,
                    piece,
                    Rendered(piece, None, False),
                    self._reply_to if i == 0 else None,
                )
                self._messages.append(msg.message_id)
                self._shown.append(piece)

    async def _finish_edits(self, final_text: str, sent: list[int]) -> None:
        pieces = split_text(final_text)
        mode = self._client.settings.parse_mode
        for i, piece in enumerate(pieces):
            rendered = render(piece, mode)
            if i >= len(self._messages):
                msg = await send_piece(self._client, self._chat, piece, rendered, None)
                sent.append(msg.message_id)
                continue
            message_id = self._messages[i]
            if rendered.formatted or rendered.text != self._shown[i]:
                # The last edit too keeps to the chat's edit schedule.
                at = self._gate.reserve_stream_slot(self._client.settings.edit_interval_seconds)
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                await edit_piece(self._client, self._chat, message_id, piece, rendered)
            sent.append(message_id)
        for message_id in self._messages[len(pieces) :]:
            await delete_message(self._client, self._chat, message_id)
