"""Replay, then follow, one conversation's events: the resume logic every streaming transport
shares (the HTTP API's Server-Sent Events, the widget's WebSocket and its SSE fallback).

The subscription is opened before the past is read, so nothing falls between the stored
history and the live stream; the cursor (see stream_cursor) drops what the client has.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from channels.base import ChannelHost, ConversationEvent, Subscription, message_event
from channels.stream_cursor import StreamCursor

REPLAY_PAGE = 500


@dataclass(slots=True)
class Opened:
    """A stream positioned for a client: subscribed, and the first page of what it missed
    read (the cursor decides while following which of it the client still needs)."""

    sub: Subscription
    past: list[ConversationEvent]
    more: bool  # the page was full: read on after it


async def open_stream(host: ChannelHost, conversation_id: int, cursor: StreamCursor) -> Opened:
    """Subscribe, then read the past (so nothing falls between the two). A transport that
    does this before telling the client the stream is open (SSE headers) cannot lose an
    answer that races the client's next request to the replay."""
    sub = host.events.subscribe(conversation_id)
    try:
        await sub.ready()
        past = await host.list_messages(
            conversation_id, after_seq=cursor.watermark, limit=REPLAY_PAGE, complete_only=True
        )
    except BaseException:
        sub.close()
        raise
    return Opened(sub, [message_event(m) for m in past], len(past) >= REPLAY_PAGE)


async def follow(
    host: ChannelHost,
    conversation_id: int,
    cursor: StreamCursor,
    *,
    heartbeat_s: float | None = None,
    opened: Opened | None = None,
) -> AsyncGenerator[ConversationEvent | None, None]:
    """Every event the client still needs, past then live; None when `heartbeat_s` passes
    quietly. Ends when the bus drops the subscription (shutdown, or the client fell behind):
    the client reconnects and resumes. Close it with `contextlib.aclosing`. `opened`: the
    result of `open_stream` for this cursor, if the caller opened the stream already."""
    if opened is None:
        opened = await open_stream(host, conversation_id, cursor)
    sub = opened.sub
    try:
        past, more = opened.past, opened.more
        while True:
            for ev in past:
                if cursor.admit(ev):
                    yield ev
            if not more:
                break
            page = await host.list_messages(
                conversation_id, after_seq=past[-1].seq, limit=REPLAY_PAGE, complete_only=True
            )
            past, more = [message_event(m) for m in page], len(page) >= REPLAY_PAGE
        live = await host.events.answer_so_far(conversation_id)
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
