"""The Telegram channel alone, for `python -m bench telegram --mode channel`.

The real `TelegramChannel` (aiogram webhook handler, normalization, reply sink, aiogram client)
runs in the benchmark process on its own aiohttp app, with a host that stores nothing and
answers with a scripted model: after `first_token_s` it pushes the simulator's reply text at
`tps` tokens per second (in `batch_s` batches). Time to first visible text minus
`first_token_s` is then what the Telegram channel adds, free of database and orchestration.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from channels.base import ConversationRef, InboundMessage, IngestResult, StoredMessage
from channels.http import json_errors
from channels.telegram.channel import TelegramChannel
from channels.telegram.config import TelegramSettings
from simulator.text import reply_tokens


class ScriptedHost:
    """A ChannelHost without storage: every message gets a scripted streamed answer."""

    def __init__(
        self,
        channel: TelegramChannel,
        first_token_s: float,
        tps: float,
        tokens: int,
        batch_s: float,
    ) -> None:
        self.channel = channel
        self.first_token_s = first_token_s
        self.tps = tps
        self.tokens = tokens
        self.batch = max(1, round(tps * batch_s))
        self.ids = itertools.count(1)
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    events: Any = None

    async def ingest(self, message: InboundMessage) -> IngestResult:
        mid = next(self.ids)
        duplicate = message.external_id in self.seen
        if message.external_id:
            self.seen.add(message.external_id)
        if message.answer and not duplicate:
            conv = ConversationRef(mid, "telegram", message.account, message.chat_id, mid, "bot")
            inbound = StoredMessage(
                id=mid,
                conversation_id=mid,
                seq=1,
                direction="in",
                sender="contact",
                kind=message.kind,
                text=message.text,
                status="received",
                created_at=datetime.now(UTC),
                external_id=message.external_id,
            )
            task = asyncio.create_task(self._answer(conv, inbound))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return IngestResult(mid, mid, mid, 1, duplicate)

    async def _answer(self, conv: ConversationRef, inbound: StoredMessage) -> None:
        sink = self.channel.open_reply(conv, inbound)
        await sink.typing()
        start = time.monotonic() + self.first_token_s
        tokens = reply_tokens(inbound.text, self.tokens)
        text = ""
        for k, i in enumerate(range(0, len(tokens), self.batch)):
            delay = start + k * self.batch / self.tps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            piece = "".join(tokens[i : i + self.batch])
            text += piece
            await sink.push(piece)
        await sink.finish(text)

    async def get_conversation(self, conversation_id: int) -> None:
        return None

    async def record_edit(self, *args: Any) -> bool:
        return True

    async def request_handoff(self, *args: Any) -> bool:
        return False

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


async def start_channel(
    section: dict[str, Any],
    *,
    first_token_s: float,
    tps: float,
    tokens: int,
    batch_s: float,
    max_body: int = 64 * 1024,
) -> tuple[web.AppRunner, ScriptedHost, str]:
    """The channel on a free port with a scripted host; returns (runner, host, base URL)."""
    channel = TelegramChannel(TelegramSettings.model_validate(section))
    host = ScriptedHost(channel, first_token_s, tps, tokens, batch_s)
    app = web.Application(client_max_size=max_body, middlewares=[json_errors])
    channel.register(app, host)  # type: ignore[arg-type]
    await channel.start()

    async def close(_: web.Application) -> None:
        await host.drain()
        await channel.close()

    app.on_cleanup.append(close)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, host, f"http://127.0.0.1:{port}"
