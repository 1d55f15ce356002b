"""Replay, then follow, one conversation's events: the resume logic every streaming transport
shares (the HTTP API's Server-Sent Events, the widget's WebSocket and its SSE fallback).

The subscription is opened before the past is read, so nothing falls between the stored
history and the live stream; the cursor (see stream_cursor) drops what the client has.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from channels.base import ChannelHost, ConversationEvent
from channels.stream_cursor import StreamCursor

REPLAY_PAGE = 500


async def follow(
    host: ChannelHost,
    conversation_id: int,
    cursor: StreamCursor,
    *,
    heartbeat_s: float | None = None,
) -> AsyncGenerator[ConversationEvent | None, None]:
    """Every event the client still needs, past then live; None when `heartbeat_s` passes
    quietly. Ends when the bus drops the subscription (shutdown, or the client fell behind):
    the client reconnects and resumes. Close it with `contextlib.aclosing`."""
    sub = host.events.subscribe(conversation_id)
    try:
        after = cursor.watermark
        while True:
            past = await host.list_messages(
                conversation_id, after_seq=after, limit=REPLAY_PAGE, complete_only=True
            )
            for m in past:
                ev = m.event()
                if cursor.admit(ev):
                    yield ev
            if len(past) < REPLAY_PAGE:
                break
            after = past[-1].seq
        live = host.events.inflight(conversation_id)
        if live is not None:
            seq, deltas = live
            if not deltas:
                # Begun, no text yet: the typing signal (not stored) for a late subscriber.
                ev = ConversationEvent(conversation_id, "typing", seq)
                if cursor.admit(ev):
                    yield ev
            for i, text in enumerate(deltas):
                ev = ConversationEvent(conversation_id, "delta", seq, i, {"text": text})
                if cursor.admit(ev):
                    yield ev
        while True:
            try:
                live_ev = await sub.get(heartbeat_s)
            except EOFError:
                return
            if live_ev is None:
                yield None
            elif cursor.admit(live_ev):
                yield live_ev
    finally:
        sub.close()
