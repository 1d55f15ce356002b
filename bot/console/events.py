"""Live events of every conversation for the agent console, as Server-Sent Events: stored
messages (`message`, `final`, `error`), owner changes and notes. Deltas and typing stay on
the shoppers' streams."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web

from bot.hub import Hub

HEARTBEAT_S = 15.0
_FOR_CONSOLE = frozenset({"message", "final", "error", "owner", "note"})


async def stream_console_events(request: web.Request, hub: Hub) -> web.StreamResponse:
    sub = hub.subscribe_all()
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await sub.ready()  # other processes' events too, before "connected"
        await resp.prepare(request)
        await resp.write(b": connected\n\n")
        while True:
            try:
                event = await sub.get(HEARTBEAT_S)
            except EOFError:
                break
            if event is None:
                await resp.write(b": heartbeat\n\n")
                continue
            if event.type not in _FOR_CONSOLE:
                continue
            data = {**event.data, "conversation_id": event.conversation_id}
            payload = json.dumps(data, ensure_ascii=False, default=str)
            await resp.write(f"event: {event.type}\ndata: {payload}\n\n".encode())
    except (ConnectionResetError, RuntimeError):
        pass  # the console went away
    finally:
        sub.close()
        with contextlib.suppress(Exception):
            await resp.write_eof()
    return resp
