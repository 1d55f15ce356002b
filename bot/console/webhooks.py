"""Outgoing webhooks: handoffs and agents' moves POSTed to a shop's endpoints (to page its
people), signed with HMAC-SHA256 over the timestamp and the body, retried with backoff, and
each attempt kept in the delivery log (webhook_deliveries).

Signature header: `X-Swarmdesk-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(secret, f"{t}.{body}"). A receiver recomputes it and refuses a `t` older than
five minutes: a captured request cannot be replayed later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from functools import partial
from typing import Any

import httpx
import structlog

from bot.hub import Hub
from bot.settings import WebhookSettings
from storage import inbox, webhook_log
from storage.executor import Database
from storage.models import utcnow

log = structlog.get_logger(__name__)

# Owner events of the event bus (Hub.announce) -> webhook event names.
EVENTS = {
    "handoff": "handoff.requested",
    "claim": "conversation.claimed",
    "assign": "conversation.assigned",
    "unassign": "conversation.unassigned",
    "resolve": "conversation.resolved",
    "handback": "conversation.handed_back",
}
_MAX_BACKOFF_S = 300.0
_TIMEOUT_S = 10.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def missing_secrets(hooks: list[WebhookSettings]) -> list[str]:
    return [h.secret_env for h in hooks if not os.environ.get(h.secret_env)]


class Webhooks:
    def __init__(self, hooks: list[WebhookSettings], hub: Hub, db: Database) -> None:
        self.hooks = hooks
        self.hub = hub
        self.db = db
        self._client = httpx.AsyncClient(timeout=_TIMEOUT_S)
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.hooks:
            self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _listen(self) -> None:
        # Each process posts its own events: one webhook per event across the processes.
        sub = self.hub.subscribe_all(local_only=True)
        try:
            while True:
                try:
                    event = await sub.get()
                except EOFError:
                    return
                if event is None or event.type != "owner":
                    continue
                name = EVENTS.get(str(event.data.get("action")))
                if name is None:
                    continue
                for hook in self.hooks:
                    if name in hook.events:
                        self._spawn(self._deliver(hook, name, event.conversation_id, event.data))
        finally:
            sub.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, hook: WebhookSettings, name: str, conversation_id: int, data: dict[str, Any]
    ) -> None:
        conversation = await self.db.read(
            partial(inbox.conversation, conversation_id=conversation_id)
        )
        event_id = uuid.uuid4().hex
        body = json.dumps(
            {
                "id": event_id,
                "event": name,
                "created_at": utcnow().isoformat(),
                "reason": data.get("reason"),
                "conversation": conversation,
            },
            ensure_ascii=False,
            default=str,
        ).encode()
        secret = os.environ.get(hook.secret_env, "")
        wait = hook.retry_initial_seconds
        for attempt in range(1, hook.max_attempts + 1):
            status, error = await self._post(hook.url, secret, body)
            await self.db.write(
                partial(
                    webhook_log.log_attempt,
                    row={
                        "event_id": event_id,
                        "event": name,
                        "url": hook.url,
                        "attempt": attempt,
                        "status_code": status,
                        "error": error,
                        "created_at": utcnow(),
                    },
                )
            )
            if status is not None and 200 <= status < 300:
                return
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                break  # the receiver refuses this request: sending it again won't help
            if attempt < hook.max_attempts:
                await asyncio.sleep(wait)
                wait = min(wait * 2, _MAX_BACKOFF_S)
        log.warning("webhook_gave_up", url=hook.url, event=name, event_id=event_id)

    async def _post(self, url: str, secret: str, body: bytes) -> tuple[int | None, str | None]:
        headers = {
            "Content-Type": "application/json",
            "X-Swarmdesk-Signature": sign(secret, int(time.time()), body),
        }
        try:
            r = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"[:500]
        return r.status_code, None if r.is_success else r.text[:500]
