"""One bot's Bot API client: aiogram's `Bot`, plus the per-chat state every sender shares.

Telegram limits each chat: a 429 answer carries `retry_after`, and until it has passed every
call to that chat (any sink, any message) waits. Streamed updates of one chat (drafts or
edits) share one schedule, so two answers in one group still edit at most once a second.
With several processes the pause of a 429 holds for all of them (`pauses`, in Redis).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import structlog
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.methods import GetMe, TelegramMethod

from channels.base import TakenOver, may_send
from channels.telegram import metrics
from channels.telegram.config import TelegramBotSettings

if TYPE_CHECKING:
    from channels.telegram.shared_pauses import SharedChatPauses

log = structlog.get_logger(__name__)
T = TypeVar("T")

_MAX_GATES = 10_000  # chats remembered; idle ones are forgotten first
_IDLE_S = 300.0
_CONNECT_RETRY_S = 0.5


@dataclass(slots=True)
class ChatGate:
    blocked_until: float = 0.0  # monotonic time before which this chat takes no calls (429)
    next_stream_at: float = 0.0  # earliest time of the chat's next streamed update
    used_at: float = 0.0

    async def wait_open(self) -> None:
        # A loop, not one sleep: another 429 may extend the pause meanwhile.
        while (delay := self.blocked_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)

    def reserve_stream_slot(self, interval: float) -> float:
        """Book the chat's next streamed update; returns when it may be sent."""
        now = time.monotonic()
        at = max(now, self.next_stream_at, self.blocked_until)
        self.next_stream_at = at + interval
        return at

    def stream_update_leaves(self, interval: float) -> None:
        """A streamed update is sent now: the next waits a whole interval from now, also
        when this one left later than booked (a busy loop), so two never arrive closer."""
        self.next_stream_at = max(self.next_stream_at, time.monotonic() + interval)

    def release_stream_slot(self, at: float, interval: float) -> None:
        """Give back a booked slot that went unused (the answer finished first)."""
        if self.next_stream_at == at + interval:
            self.next_stream_at = at


class BotClient:
    def __init__(self, settings: TelegramBotSettings, token: str) -> None:
        self.settings = settings
        self.account = settings.account
        session = AiohttpSession(
            api=TelegramAPIServer.from_base(settings.api_base_url),
            timeout=settings.request_timeout_seconds,
        )
        self.bot = Bot(token=token, session=session)
        self.drafts_available = settings.drafts
        self._username = settings.username
        self._me_lock = asyncio.Lock()
        self._gates: dict[int, ChatGate] = {}
        self.pauses: SharedChatPauses | None = None  # the chats' 429 pauses of all processes

    @property
    def bot_id(self) -> int:
        return self.bot.id

    async def username(self) -> str:
        """The bot's @username without '@' (asked once with getMe unless configured)."""
        if self._username is None:
            async with self._me_lock:
                if self._username is None:
                    me = await self.call(GetMe())
                    self._username = me.username or ""
        return self._username

    def gate(self, chat_id: int) -> ChatGate:
        gate = self._gates.get(chat_id)
        now = time.monotonic()
        if gate is None:
            if len(self._gates) >= _MAX_GATES:
                self._forget_idle(now)
            gate = self._gates[chat_id] = ChatGate()
        gate.used_at = now
        return gate

    def _forget_idle(self, now: float) -> None:
        for chat_id, g in list(self._gates.items()):
            if now - g.used_at > _IDLE_S and g.blocked_until < now:
                del self._gates[chat_id]
        if len(self._gates) >= _MAX_GATES:  # all busy: drop the oldest half
            for chat_id, _ in sorted(self._gates.items(), key=lambda kv: kv[1].used_at)[
                : _MAX_GATES // 2
            ]:
                del self._gates[chat_id]

    async def call(
        self,
        method: TelegramMethod[T],
        chat_id: int | None = None,
        *,
        retries: int = 5,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> T:
        """Call the Bot API. Waits while the chat is rate-limited; on 429 blocks the chat for
        `retry_after` and tries again (up to `retries` times, 0: raise at once). A call that
        is not `idempotent` (sending a message) is retried only when it certainly did not
        happen (429, a connection that never opened), so nothing is ever sent twice."""
        name = method.__api_method__
        gate = self.gate(chat_id) if chat_id is not None else None
        attempt = 0
        while True:
            if gate is not None:
                await gate.wait_open()
                if self.pauses is not None and chat_id is not None:
                    await self._wait_shared_pause(self.pauses, gate, chat_id)
            if not may_send():
                raise TakenOver(name)  # a person took over while this waited
            try:
                result = await self.bot(method, request_timeout=int(timeout) if timeout else None)
            except TelegramRetryAfter as e:
                metrics.API_CALLS.labels(self.account, name, "retry_after").inc()
                metrics.RETRY_AFTER_SECONDS.labels(self.account).inc(e.retry_after)
                log.warning(
                    "telegram_retry_after",
                    account=self.account,
                    method=name,
                    chat_id=chat_id,
                    retry_after=e.retry_after,
                )
                if gate is not None:
                    gate.blocked_until = max(gate.blocked_until, time.monotonic() + e.retry_after)
                    if self.pauses is not None and chat_id is not None:
                        await self.pauses.hold(chat_id, e.retry_after)
                if attempt >= retries:
                    raise
                if gate is None:
                    await asyncio.sleep(e.retry_after)
            except (TelegramServerError, TelegramNetworkError) as e:
                metrics.API_CALLS.labels(self.account, name, "error").inc()
                never_sent = isinstance(e.__cause__, aiohttp.ClientConnectorError)
                if attempt >= retries or not (never_sent or idempotent):
                    raise
                await asyncio.sleep(_CONNECT_RETRY_S * (attempt + 1))
            except Exception:
                metrics.API_CALLS.labels(self.account, name, "error").inc()
                raise
            else:
                metrics.API_CALLS.labels(self.account, name, "ok").inc()
                return result
            attempt += 1

    @staticmethod
    async def _wait_shared_pause(pauses: SharedChatPauses, gate: ChatGate, chat_id: int) -> None:
        """Wait out a pause another process was told for this chat (the chat's streamed
        updates book their slots after it too)."""
        while (left := await pauses.remaining(chat_id)) > 0:
            gate.blocked_until = max(gate.blocked_until, time.monotonic() + left)
            await gate.wait_open()

    async def close(self) -> None:
        await self.bot.session.close()
