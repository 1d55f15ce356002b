"""Server-Sent Events writer for conversation streams (the HTTP API's stream and the widget's
fallback): frames carry the resume token as their id, so a reconnecting EventSource resumes
with Last-Event-ID where it stopped."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

from aiohttp import web

from channels.base import ChannelHost, ConversationEvent
from channels.http import ApiError, parse_id
from channels.replay import follow, open_stream
from channels.stream_cursor import StreamCursor

HEARTBEAT_S = 15.0
# What json.dumps(..., ensure_ascii=False) does to a string.
_json_str = json.encoder.encode_basestring


def frame(event: ConversationEvent, cursor: StreamCursor) -> bytes:
    data = event.data
    if event.index is not None and len(data) == 1 and type(data.get("text")) is str:
        # A plain delta (the bulk of a stream): the same JSON as below, built directly.
        payload = (
            f'{{"text": {_json_str(data["text"])}, "seq": {event.seq}, "index": {event.index}}}'
        )
    else:
        full = dict(data)
        full["seq"] = event.seq
        if event.index is not None:
            full["index"] = event.index
        payload = json.dumps(full, ensure_ascii=False)
    return f"id: {cursor.token()}\nevent: {event.type}\ndata: {payload}\n\n".encode()


def resume_token(request: web.Request) -> str | None:
    """Where the client left off: Last-Event-ID (header or query), else `?after=SEQ`; a
    400 ApiError for one we could not have written."""
    token = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if token:
        # An id we wrote (see StreamCursor.token): "W" or "W-seq.index".
        head, dash, tail = token.strip().partition("-")
        seq, dot, index = tail.partition(".")
        parts = [head, seq, index] if dash else [head]
        if (dash and not dot) or any(parse_id(p) is None for p in parts):
            raise ApiError(
                400, "invalid_parameter", "Last-Event-ID must be an event id this stream sent"
            )
        return token
    after = request.query.get("after")
    if after is None or after == "":
        return None
    if parse_id(after) is None:
        raise ApiError(400, "invalid_parameter", "'after' must be an integer from 0 to 2^63-1")
    return after


async def stream_events(
    request: web.Request,
    host: ChannelHost,
    conversation_id: int,
    cursor: StreamCursor,
    *,
    headers: Mapping[str, str] | None = None,
    preamble: bytes = b"",
) -> web.StreamResponse:
    """Write the conversation's events from `cursor` on, until either end goes away."""
    # Positioned before the headers go out: a client that waits for them and then posts
    # sees the answer delta by delta, however fast it comes.
    opened = await open_stream(host, conversation_id, cursor)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: don't buffer the stream
            **(headers or {}),
        }
    )
    try:
        await resp.prepare(request)
    except BaseException:
        opened.sub.close()
        raise
    events = follow(host, conversation_id, cursor, heartbeat_s=HEARTBEAT_S, opened=opened)
    try:
        async with contextlib.aclosing(events):
            await resp.write(b"retry: 2000\n\n" + preamble)
            async for ev in events:
                if ev is None:
                    await resp.write(b": keep-alive\n\n")
                else:
                    await resp.write(frame(ev, cursor))
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        opened.sub.close()  # (also when the generator never started)
    return resp
