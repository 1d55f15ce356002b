"""Server-Sent Events of one conversation, resumable with Last-Event-ID (see stream_cursor)."""

from __future__ import annotations

import json

from aiohttp import web

from channels.base import ChannelHost, ConversationEvent
from channels.stream_cursor import StreamCursor

HEARTBEAT_S = 15.0
REPLAY_LIMIT = 500


def _frame(event: ConversationEvent, cursor: StreamCursor) -> bytes:
    data = dict(event.data)
    data["seq"] = event.seq
    if event.index is not None:
        data["index"] = event.index
    payload = json.dumps(data, ensure_ascii=False)
    return f"id: {cursor.token()}\nevent: {event.type}\ndata: {payload}\n\n".encode()


async def stream_conversation(
    request: web.Request, host: ChannelHost, conversation_id: int
) -> web.StreamResponse:
    token = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    after = request.query.get("after")
    if not token and after is not None and after.lstrip("-").isdigit():
        token = str(max(0, int(after)))
    cursor = StreamCursor.parse(token, await host.resume_point(conversation_id))

    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: don't buffer the stream
        }
    )
    await resp.prepare(request)
    # Subscribe before reading the past so nothing falls between the two.
    sub = host.events.subscribe(conversation_id)
    try:
        await resp.write(b"retry: 2000\n\n")
        while True:
            past = await host.list_messages(
                conversation_id, after_seq=cursor.watermark, limit=REPLAY_LIMIT, complete_only=True
            )
            for m in past:
                ev = m.event()
                if cursor.admit(ev):
                    await resp.write(_frame(ev, cursor))
            if len(past) < REPLAY_LIMIT:
                break
        live = host.events.inflight(conversation_id)
        if live is not None:
            seq, deltas = live
            for i, text in enumerate(deltas):
                ev = ConversationEvent(conversation_id, "delta", seq, i, {"text": text})
                if cursor.admit(ev):
                    await resp.write(_frame(ev, cursor))
        while True:
            try:
                live_ev = await sub.get(HEARTBEAT_S)
            except EOFError:
                break  # the bus dropped us (shutdown, or we fell behind): client resumes
            if live_ev is None:
                await resp.write(b": keep-alive\n\n")
                continue
            if cursor.admit(live_ev):
                await resp.write(_frame(live_ev, cursor))
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        sub.close()
    return resp
