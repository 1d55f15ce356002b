"""The floor: a bare aiohttp relay that speaks the HTTP API channel's wire protocol.

`python -m bench api --service floor` runs this instead of swarmdesk. It does the same
network work per message as the service (one POST answered 202, one streamed model call,
the first token passed on at once and the rest every 100 ms over a conversation's SSE
stream, a final event) and nothing else: no database, no orchestration, no logging or
metrics. What it adds to the simulator's first token is what one Python process with
aiohttp adds on this machine at that rate, so it tells how much of the service's overhead
is its own work and how much any design of this shape would pay.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections import defaultdict
from typing import Any

import aiohttp
import orjson
from aiohttp import web

FLUSH_S = 0.1  # swarmdesk's reply.stream_flush_ms default


class Relay:
    def __init__(self, model_url: str, model: str) -> None:
        self.model_url = model_url
        self.model = model
        self.ids = itertools.count(1)
        self.seqs: dict[int, int] = defaultdict(int)
        self.locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.subscribers: dict[int, set[asyncio.Queue[bytes]]] = defaultdict(set)
        self.backlog: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def publish(self, conv: int, seq: int, event: str, data: dict[str, Any]) -> None:
        frame = f"id: {seq}\nevent: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
        if event == "final":
            self.backlog[conv].append((seq, frame))  # replayed to a late subscriber
        for q in self.subscribers[conv]:
            q.put_nowait(frame)

    async def post_message(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        conv = int(body.get("conversation_id") or next(self.ids))
        self.seqs[conv] += 1
        seq = self.seqs[conv]
        message_id = next(self.ids)
        task = asyncio.create_task(self.answer(conv, message_id, str(body["text"])))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return web.json_response(
            {"message_id": message_id, "conversation_id": conv, "seq": seq, "duplicate": False},
            status=202,
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def answer(self, conv: int, message_id: int, text: str) -> None:
        async with self.locks[conv]:
            self.seqs[conv] += 1
            seq = self.seqs[conv]
            assert self.session is not None
            payload = {
                "model": self.model,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": text}],
            }
            parts: list[str] = []
            pending: list[str] = []
            index = 0
            flush: asyncio.TimerHandle | None = None
            loop = asyncio.get_running_loop()

            def send() -> None:
                nonlocal index, flush
                flush = None
                if pending:
                    self.publish(
                        conv, seq, "delta", {"text": "".join(pending), "seq": seq, "index": index}
                    )
                    index += 1
                    pending.clear()

            async with self.session.post(self.model_url, data=orjson.dumps(payload)) as r:
                rest = b""
                while True:
                    data = await r.content.readany()
                    if not data:
                        break
                    lines = (rest + data).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                            continue
                        chunk = orjson.loads(line[5:])
                        choices = chunk.get("choices") or []
                        piece = choices[0].get("delta", {}).get("content") if choices else None
                        if piece:
                            parts.append(piece)
                            pending.append(piece)
                    if pending and index == 0:
                        send()  # the first token at once
                    elif pending and flush is None:
                        flush = loop.call_later(FLUSH_S, send)
            if flush is not None:
                flush.cancel()
            send()
            self.publish(
                conv, seq, "final", {"text": "".join(parts), "seq": seq, "reply_to_id": message_id}
            )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        conv = int(request.match_info["conv"])
        q: asyncio.Queue[bytes] = asyncio.Queue()
        self.subscribers[conv].add(q)
        after = int(request.query.get("after", "0"))
        for seq, frame in self.backlog[conv]:
            if seq > after:
                q.put_nowait(frame)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(await q.get())
        finally:
            self.subscribers[conv].discard(q)

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="")


async def main(port: int, model_url: str, model: str) -> None:
    relay = Relay(model_url, model)
    relay.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app = web.Application()
    app.router.add_post("/api/v1/messages", relay.post_message)
    app.router.add_get("/api/v1/conversations/{conv}/stream", relay.stream)
    app.router.add_get("/readyz", relay.ok)
    app.router.add_get("/healthz", relay.ok)
    app.router.add_get("/metrics", relay.metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await relay.session.close()
        await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-url", required=True, help="…/v1/chat/completions")
    p.add_argument("--model", default="sim-cheap")
    a = p.parse_args()
    asyncio.run(main(a.port, a.model_url, a.model))
