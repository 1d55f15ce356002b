"""Receiving updates: aiogram's webhook handler mounted in swarmdesk's app, and long polling.

Both paths end in `UpdateFeed.feed`: the aiogram Dispatcher routes the update to the
channel's handlers, which store it (host.ingest) before the webhook answers 200 or the
polling offset moves past it, so Telegram redelivers whatever we did not keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
from aiogram import Dispatcher
from aiogram.dispatcher.event.bases import UNHANDLED
from aiogram.exceptions import TelegramAPIError, TelegramConflictError
from aiogram.methods import DeleteWebhook, GetUpdates
from aiogram.types import Update
from aiogram.types.update import UpdateTypeLookupError
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web
from pydantic import ValidationError

from channels.http import ApiError, read_json
from channels.telegram import metrics
from channels.telegram.client import BotClient
from cluster.redis import REDIS_DOWN

log = structlog.get_logger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ["message", "edited_message"]
_RECENT_UPDATES = 4096
_POLL_TIMEOUT_S = 25

# Held while a bot is polled, so that one process of several polls it (Telegram refuses a
# second getUpdates with 409); None when one process serves everything.
PollGuard = Callable[[str], AbstractAsyncContextManager[object]]


class UpdateFeed:
    """One bot's way into the dispatcher, shared by its webhook and its polling loop."""

    def __init__(self, dispatcher: Dispatcher, client: BotClient) -> None:
        self.dispatcher = dispatcher
        self.client = client
        # Update ids handled lately: a redelivery is acknowledged without touching storage
        # (storage dedupes too; this spares it the work and keeps edits from being re-applied).
        self._recent: OrderedDict[int, None] = OrderedDict()

    def parse(self, body: dict[str, Any]) -> Update | None:
        """The aiogram Update, or None for one that Telegram sent but aiogram cannot read
        (acknowledged, so Telegram does not hold the bot's queue on it)."""
        update_id = body.get("update_id")
        if not isinstance(update_id, int) or isinstance(update_id, bool):
            raise ApiError(400, "invalid_update", "a Telegram Update needs an integer update_id")
        try:
            return Update.model_validate(body, context={"bot": self.client.bot})
        except ValidationError as e:
            log.error(
                "telegram_update_unreadable",
                account=self.client.account,
                update_id=update_id,
                detail=str(e)[:500],
            )
            metrics.UPDATES.labels(self.client.account, "unknown", "invalid").inc()
            return None

    async def feed(self, update: Update, raw: dict[str, Any] | None) -> None:
        account = self.client.account
        try:
            update_type = update.event_type
        except UpdateTypeLookupError:
            update_type = "unknown"
        if update.update_id in self._recent:
            metrics.UPDATES.labels(account, update_type, "duplicate").inc()
            return
        if update_type == "unknown":
            # A newer Bot API than this aiogram knows: keep a trace, answer 200.
            log.info("telegram_update_unknown", account=account, update_id=update.update_id)
            metrics.UPDATES.labels(account, update_type, "unhandled").inc()
        else:
            result = await self.dispatcher.feed_update(
                self.client.bot, update, client=self.client, raw=raw
            )
            if result is UNHANDLED:
                log.info(
                    "telegram_update_unhandled",
                    account=account,
                    update_id=update.update_id,
                    type=update_type,
                )
                metrics.UPDATES.labels(account, update_type, "unhandled").inc()
        self._recent[update.update_id] = None
        if len(self._recent) > _RECENT_UPDATES:
            self._recent.popitem(last=False)


class WebhookHandler(SimpleRequestHandler):
    """aiogram's aiohttp webhook handler, made strict: secret checked in constant time
    (401), body bounded (413) and parsed (400) before anything is stored, and the update
    handled inside the request so it is stored before Telegram gets its 200."""

    def __init__(self, feed: UpdateFeed, secret_token: str) -> None:
        super().__init__(
            feed.dispatcher, feed.client.bot, handle_in_background=False, secret_token=secret_token
        )
        self.feed = feed

    def verify_secret(self, telegram_secret_token: str, bot: Any) -> bool:
        if not self.secret_token:
            return False  # never open: a webhook is mounted only with a secret
        return secrets.compare_digest(telegram_secret_token.encode(), self.secret_token.encode())

    def mount(self, app: web.Application, path: str) -> None:
        # Not `register()`: that also closes the bot session on shutdown, before in-flight
        # answers have been delivered; the channel closes it last.
        app.router.add_post(path, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if not self.verify_secret(request.headers.get(SECRET_HEADER, ""), self.bot):
            raise ApiError(
                401,
                "unauthorized",
                f"the {SECRET_HEADER} header does not match this bot's secret; run "
                "'swarmdesk telegram set-webhook' to register the current one",
            )
        body = await read_json(request)
        update = self.feed.parse(body)
        if update is not None:
            await self.feed.feed(update, body)
        return web.json_response({})


class Poller:
    """Long polling for development: getUpdates in a loop, each update fed in order. The
    offset moves past an update only once it is stored, so a failure retries it. With
    several processes one polls each bot at a time (`guard`); the others wait to take over
    (from Telegram's unconfirmed updates: what the last one stored comes back as
    duplicates)."""

    def __init__(
        self, feed: UpdateFeed, *, on_error_delay: float = 3.0, guard: PollGuard | None = None
    ) -> None:
        self.feed = feed
        self.delay = on_error_delay
        self._guard = guard
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            self._run(), name=f"telegram-poll-{self.feed.client.account}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        if self._guard is None:
            await self._poll()
            return
        while True:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self._guard(self.feed.client.account))
                except REDIS_DOWN as e:
                    # Polling without the guard would fight the other processes (409s).
                    log.warning("telegram_poll_guard_unavailable", error=repr(e))
                    await asyncio.sleep(self.delay)
                    continue
                await self._poll()

    async def _poll(self) -> None:
        client = self.feed.client
        try:
            await client.call(DeleteWebhook(drop_pending_updates=False))
        except TelegramAPIError as e:
            log.warning("telegram_delete_webhook_failed", account=client.account, detail=str(e))
        log.info("telegram_polling", account=client.account)
        offset: int | None = None
        while True:
            try:
                updates = await client.bot(
                    GetUpdates(
                        offset=offset, timeout=_POLL_TIMEOUT_S, allowed_updates=ALLOWED_UPDATES
                    ),
                    request_timeout=_POLL_TIMEOUT_S + 10,
                )
            except TelegramConflictError as e:
                log.error(
                    "telegram_polling_conflict",
                    account=client.account,
                    detail=f"{e.message}: another process polls this bot, or a webhook is set",
                )
                await asyncio.sleep(self.delay)
                continue
            except TelegramAPIError as e:
                log.warning("telegram_polling_failed", account=client.account, detail=str(e))
                await asyncio.sleep(self.delay)
                continue
            for update in updates:
                if not await _guarded(self.feed.feed(update, _raw(update)), client.account):
                    await asyncio.sleep(self.delay)
                    break
                offset = update.update_id + 1


async def _guarded(run: Awaitable[None], account: str) -> bool:
    try:
        await run
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("telegram_update_failed", account=account)
        return False
    return True


def _raw(update: Update) -> dict[str, Any]:
    data: dict[str, Any] = update.model_dump(mode="json", exclude_none=True, by_alias=True)
    return data
