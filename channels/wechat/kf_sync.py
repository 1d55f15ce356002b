"""Pulling one service account's messages with `kf/sync_msg`, from the cursor in the database.

A callback only says "there is something new" (with a sync token valid 10 minutes); the
messages come from `sync_msg`, page by page (`has_more`), starting at the cursor where the
last pull stopped. The cursor is saved only after every message of a page is stored, so a
pull cut anywhere (an error, a crash, a restart) starts again from the page it was on, and
the messages stored already come back as duplicates (each is stored once by its msgid).

One pull per account runs at a time in this process (an asyncio lock); callbacks that
arrive meanwhile ask for one more pull after it, however many they are. With several
processes (`redis_pull_guard`) a pull also holds the account's Redis lock, renewed while it
runs: a callback landing on another process waits for that pull to end and then pulls from
the cursor it left (usually nothing new); if the holder dies, its lease runs out and the
waiting process takes over. Without Redis a process pulls on its own (logged): each message
is still stored once, by its msgid.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

import structlog
from redis.asyncio import Redis

from channels.wechat.api import WechatApiError
from channels.wechat.kf_api import KF_BAD_SYNC_TOKEN, KfApi, SyncPage
from cluster.redis import REDIS_DOWN
from cluster.renewed_lock import renewed_lock
from storage import kf_cursor
from storage.executor import Database

log = structlog.get_logger(__name__)

# Stores a page of messages, in order; raises if one could not be stored (the page is pulled
# again).
HandlePage = Callable[[list[dict[str, Any]]], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]
# Held around each pull so that one process at a time pulls an account (the name says which).
PullGuard = Callable[[str], AbstractAsyncContextManager[None]]

PULL_LEASE_S = 15.0  # a holder that stops renewing (died, hung) frees the account this soon


def redis_pull_guard(
    redis: Redis, lock_name: Callable[[str], str], lease_s: float = PULL_LEASE_S
) -> PullGuard:
    """The guard of processes sharing Redis: the account's lock, renewed while pulling."""

    @contextlib.asynccontextmanager
    async def guard(name: str) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    renewed_lock(redis, lock_name(name), lease_s=lease_s)
                )
            except REDIS_DOWN as e:
                log.warning("wecom_kf_pull_unguarded", account=name, error=repr(e))
            yield

    return guard


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
        guard: PullGuard | None = None,
    ) -> None:
        self.account = account
        self.open_kfid = open_kfid
        self._api = api
        self._db = db
        self._handle = handle
        self._spawn = spawn
        self._page_size = page_size
        self._guard = guard
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
        async with self._lock:
            if self._guard is None:
                return await self._pull()
            async with self._guard(f"{self.account}:{self.open_kfid}"):
                return await self._pull()

    async def _pull(self) -> int:
        seen = 0
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
