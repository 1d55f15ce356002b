"""Pulling one service account's messages with `kf/sync_msg`, from the cursor in the database.

A callback only says "there is something new" (with a sync token valid 10 minutes); the
messages come from `sync_msg`, page by page (`has_more`), starting at the cursor where the
last pull stopped. The cursor is saved only after every message of a page is stored, so a
pull cut anywhere (an error, a crash, a restart) starts again from the page it was on, and
the messages stored already come back as duplicates (each is stored once by its msgid).

One pull per account runs at a time in this process (an asyncio lock); callbacks that
arrive meanwhile ask for one more pull after it, however many they are. Across replicas the
same lock will have to live in Redis or PostgreSQL (scale-out); until then one process
serves the account.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import structlog

from channels.wechat.api import WechatApiError
from channels.wechat.kf_api import KF_BAD_SYNC_TOKEN, KfApi, SyncPage
from storage import kf_cursor
from storage.executor import Database

log = structlog.get_logger(__name__)

# Stores a page of messages, in order; raises if one could not be stored (the page is pulled
# again).
HandlePage = Callable[[list[dict[str, Any]]], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Puller:
    def __init__(
        self,
        account: str,
        open_kfid: str,
        api: KfApi,
        db: Database,
        handle: HandlePage,
        spawn: Spawn,
        page_size: int,
    ) -> None:
        self.account = account
        self.open_kfid = open_kfid
        self._api = api
        self._db = db
        self._handle = handle
        self._spawn = spawn
        self._page_size = page_size
        self._lock = asyncio.Lock()
        self._wanted = False
        self._token: str | None = None
        self._task: asyncio.Task[Any] | None = None
        self.pulls = 0  # sync_msg pages fetched (bench, tests)

    def kick(self, sync_token: str | None = None) -> None:
        """Pull soon (a callback, the safety timer); bursts of kicks make one or two pulls."""
        if sync_token:
            self._token = sync_token
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                await self.pull()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The cursor stayed where the last whole page ended: the next callback or
                # the safety pull starts there again.
                log.warning("wecom_kf_pull_failed", account=self.account, error=repr(e))

    async def pull(self) -> int:
        """Fetch and store everything new; the number of items seen."""
        seen = 0
        async with self._lock:
            cursor = await self._db.read(
                partial(kf_cursor.get_cursor, account=self.account, open_kfid=self.open_kfid)
            )
            while True:
                page = await self._page(cursor)
                seen += len(page.messages)
                await self._handle(page.messages)
                if page.next_cursor and page.next_cursor != cursor:
                    cursor = page.next_cursor
                    await self._db.write(
                        partial(
                            kf_cursor.save_cursor,
                            account=self.account,
                            open_kfid=self.open_kfid,
                            cursor=cursor,
                        )
                    )
                if not page.has_more:
                    return seen

    async def _page(self, cursor: str | None) -> SyncPage:
        self.pulls += 1
        token = self._token
        try:
            return await self._api.sync_msg(self.open_kfid, cursor, token, self._page_size)
        except WechatApiError as e:
            if e.errcode != KF_BAD_SYNC_TOKEN or not token:
                raise
            # The callback's token is older than 10 minutes: pull without it (lower limit).
            self._token = None
            return await self._api.sync_msg(self.open_kfid, cursor, None, self._page_size)

    async def safety_loop(self, every_s: float) -> None:
        """Pull now and then without a callback: a lost callback delays, never loses."""
        while True:
            await asyncio.sleep(every_s)
            self.kick()
