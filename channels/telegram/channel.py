"""The Telegram channel: one or more bots (one per channel account) on one aiohttp app.

Each bot has a webhook path (or polls, in development). Messages become `InboundMessage`s
keyed by `<chat id>:<message id>`, so a redelivered update never produces a second answer;
edits update the stored message; /start, /help and /human and media the bot cannot read get
their configured reactions. Answers and agent messages go out through `TelegramSink` and
`send_text`, which own Telegram's rules (drafts, edits, 4,096 characters, 429).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import structlog
from aiogram import Dispatcher, F
from aiogram.exceptions import TelegramAPIError
from aiogram.methods import SendChatAction
from aiogram.types import Message
from aiohttp import web

from channels.base import (
    Capabilities,
    Channel,
    ChannelHost,
    ConversationRef,
    Delivery,
    InboundMessage,
    ReplySink,
    StoredMessage,
)
from channels.telegram import metrics
from channels.telegram.client import BotClient
from channels.telegram.config import TelegramBotSettings, TelegramSettings
from channels.telegram.inbound import (
    CHANNEL,
    Incoming,
    classify,
    external_id,
    message_id_of,
    user_of,
)
from channels.telegram.outbound import failed, send_text
from channels.telegram.sink import TelegramSink
from channels.telegram.text import MAX_MESSAGE
from channels.telegram.updates import Poller, PollGuard, UpdateFeed, WebhookHandler

if TYPE_CHECKING:
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

_CLOSE_GRACE_S = 10.0
POLL_LEASE_S = 15.0  # a polling process that died lets another take over this soon


class TelegramConfigError(RuntimeError):
    """The environment lacks what a configured bot needs (the message says what)."""


class TelegramChannel(Channel):
    name = CHANNEL
    capabilities = Capabilities(
        max_length=MAX_MESSAGE, can_edit=True, native_drafts=True, typing=True
    )

    def __init__(self, settings: TelegramSettings) -> None:
        self.settings = settings
        problems = [
            p
            for b in settings.bots
            if (p := b.credentials_problem(need_secret=settings.mode == "webhook"))
        ]
        if problems:
            raise TelegramConfigError("; ".join(problems))
        self.clients: dict[str, BotClient] = {}
        for b in settings.bots:
            token = b.token()
            assert token is not None
            self.clients[b.account] = BotClient(b, token)
        # No conversation state lives in aiogram (the pipeline keeps it): no FSM per update.
        self.dispatcher = Dispatcher(name="swarmdesk-telegram", disable_fsm=True)
        self.dispatcher.message.register(self._on_message)
        self.dispatcher.edited_message.register(self._on_edit, F.text | F.caption)
        self.feeds = {a: UpdateFeed(self.dispatcher, c) for a, c in self.clients.items()}
        self._pollers: list[Poller] = []
        self._poll_guard: PollGuard | None = None  # share(): one process polls a bot
        self._host: ChannelHost | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sink_tasks: set[asyncio.Task[None]] = set()  # typing and draft loops of sinks

    # -- Channel -------------------------------------------------------------------------

    def share(self, cluster: RedisParts) -> None:
        # A chat's 429 pause holds for every process; one process polls a bot.
        from channels.telegram.shared_pauses import SharedChatPauses
        from cluster.renewed_lock import renewed_lock

        for account, client in self.clients.items():
            client.pauses = SharedChatPauses(cluster, account)
        keys = cluster.keys

        def guard(account: str) -> AbstractAsyncContextManager[object]:
            return renewed_lock(cluster.state, keys("tg_polling", account), lease_s=POLL_LEASE_S)

        self._poll_guard = guard

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        if self.settings.mode == "polling":
            return  # updates come from getUpdates: a webhook route would only invite forgeries
        for b in self.settings.bots:
            secret = b.secret_token()
            if not secret:  # checked when the channel was built; the env may have changed
                raise TelegramConfigError(f"{b.secret_token_env} is unset: no webhook without it")
            handler = WebhookHandler(self.feeds[b.account], secret)
            handler.mount(app, b.path)

    async def start(self) -> None:
        for client in self.clients.values():
            self._spawn(self._introduce(client))
        if self.settings.mode == "polling":
            for feed in self.feeds.values():
                poller = Poller(feed, guard=self._poll_guard)
                poller.start()
                self._pollers.append(poller)

    async def close(self) -> None:
        for poller in self._pollers:
            await poller.stop()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=_CLOSE_GRACE_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Answers the pipeline gave up on at shutdown: their previews stop here (they are
        # answered again after the restart).
        leftovers = list(self._sink_tasks)
        for t in leftovers:
            t.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        for client in self.clients.values():
            await client.close()

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        client = self.clients.get(conversation.account)
        if client is None:
            return _NoBot(conversation.account)
        chat_id = int(conversation.chat_id)
        private = chat_id > 0  # Telegram: users positive, groups and channels negative
        return TelegramSink(
            client,
            chat_id,
            private=private,
            reply_to=None if private else message_id_of(inbound.external_id),
            inbound_id=inbound.id,
            tasks=self._sink_tasks,
        )

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        client = self.clients.get(conversation.account)
        if client is None:
            return _NoBot(conversation.account).delivery()
        sent: list[int] = []
        try:
            await send_text(client, int(conversation.chat_id), text, sent=sent)
        except Exception as e:
            log.warning("telegram_send_failed", conversation_id=conversation.id, detail=str(e))
            return failed(e, sent)
        return Delivery([str(i) for i in sent])

    async def agent_typing(self, conversation: ConversationRef) -> None:
        client = self.clients.get(conversation.account)
        if client is None:
            return
        chat = int(conversation.chat_id)
        with contextlib.suppress(TelegramAPIError):  # only a hint: never worth an error
            await client.call(SendChatAction(chat_id=chat, action="typing"), chat, retries=0)

    # -- updates -------------------------------------------------------------------------

    @property
    def host(self) -> ChannelHost:
        assert self._host is not None, "the channel was not registered"
        return self._host

    async def _on_message(
        self, message: Message, client: BotClient, raw: dict[str, Any] | None = None
    ) -> None:
        account = client.account
        if message.from_user is not None and message.from_user.is_bot and not message.sender_chat:
            metrics.UPDATES.labels(account, "message", "ignored").inc()
            return  # other bots in a group (anonymous admins come as a bot with sender_chat)
        private = message.chat.type == "private"
        username = "" if private else await client.username()
        incoming = classify(
            message,
            bot_id=client.bot_id,
            username=username,
            group_replies=client.settings.group_replies,
        )
        if incoming is None:
            metrics.UPDATES.labels(account, "message", "ignored").inc()
            return  # service messages: joins, pins, title changes
        user_id, user_name = user_of(message)
        answer = incoming.addressed and incoming.readable and incoming.command is None
        result = await self.host.ingest(
            InboundMessage(
                channel=CHANNEL,
                account=account,
                chat_id=str(message.chat.id),
                user_id=user_id,
                external_id=external_id(message.chat.id, message.message_id),
                kind="command" if incoming.command else incoming.kind,
                text=incoming.text,
                attachments=incoming.attachments,
                sent_at=message.date,
                raw=raw,
                user_name=user_name,
                answer=answer,
            )
        )
        if result.duplicate:
            metrics.UPDATES.labels(account, "message", "duplicate").inc()
            return
        metrics.UPDATES.labels(account, "message", "stored").inc()
        if not incoming.addressed:
            return
        if incoming.command is not None:
            await self._command(client.settings, result.conversation_id, incoming.command)
        elif not incoming.readable:
            self._spawn(self._unreadable(client.settings, result.conversation_id, incoming))

    async def _on_edit(
        self, edited_message: Message, client: BotClient, raw: dict[str, Any] | None = None
    ) -> None:
        message = edited_message
        username = "" if message.chat.type == "private" else await client.username()
        incoming = classify(
            message, bot_id=client.bot_id, username=username, group_replies="always"
        )
        text = incoming.text if incoming is not None else (message.text or message.caption or "")
        key = external_id(message.chat.id, message.message_id)
        if await self.host.record_edit(CHANNEL, client.account, key, text):
            metrics.UPDATES.labels(client.account, "edited_message", "edit").inc()
            return
        # The original never reached us (sent before the bot was added): keep the text.
        user_id, user_name = user_of(message)
        await self.host.ingest(
            InboundMessage(
                channel=CHANNEL,
                account=client.account,
                chat_id=str(message.chat.id),
                user_id=user_id,
                external_id=key,
                kind=incoming.kind if incoming is not None else "text",
                text=text,
                sent_at=message.date,
                raw=raw,
                user_name=user_name,
                answer=False,
            )
        )
        metrics.UPDATES.labels(client.account, "edited_message", "stored").inc()

    async def _command(self, bot: TelegramBotSettings, conversation_id: int, command: str) -> None:
        texts = bot.texts
        if command == "start":
            self._spawn(self._say(conversation_id, texts.welcome))
        elif command == "help":
            self._spawn(self._say(conversation_id, texts.help))
        elif command == "human":
            # Recorded before Telegram gets its 200: the console sees the request at once.
            await self.host.request_handoff(conversation_id, "shopper_request", "sent /human")
            self._spawn(self._say(conversation_id, texts.human, if_bot_owned=False))

    async def _unreadable(
        self, bot: TelegramBotSettings, conversation_id: int, incoming: Incoming
    ) -> None:
        action = bot.unreadable_media
        if action == "ignore":
            return
        if action == "handoff":
            if await self.host.request_handoff(conversation_id, "unreadable_media", incoming.kind):
                await self._say(conversation_id, bot.texts.unreadable_handoff, if_bot_owned=False)
            return
        await self._say(conversation_id, bot.texts.unreadable)

    async def _say(self, conversation_id: int, text: str, *, if_bot_owned: bool = True) -> None:
        """A system message to the shopper; by default only while no person owns the chat."""
        if not text.strip():
            return
        if if_bot_owned:
            conv = await self.host.get_conversation(conversation_id)
            if conv is None or conv.owner != "bot":
                return
        await self.host.send_message(conversation_id, text, sender="system")

    async def _introduce(self, client: BotClient) -> None:
        try:
            name = await client.username()
        except TelegramAPIError as e:
            log.warning(
                "telegram_unreachable",
                account=client.account,
                detail=f"{e}; check the token and that {client.settings.api_base_url} "
                "is reachable ('swarmdesk telegram info')",
            )
            return
        log.info("telegram_bot", account=client.account, username=name, id=client.bot_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(_logged(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _logged(coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    except Exception:
        log.exception("telegram_task_failed")


class _NoBot(ReplySink):
    """A conversation of an account no longer configured: nothing can reach it."""

    def __init__(self, account: str) -> None:
        self.account = account

    def delivery(self) -> Delivery:
        return Delivery(
            ok=False,
            undeliverable=True,
            detail=f"no Telegram bot is configured for account '{self.account}'",
        )

    async def push(self, delta: str) -> None:
        return None

    async def finish(self, final_text: str) -> Delivery:
        return self.delivery()

    async def fail(self, reason: str) -> None:
        return None
