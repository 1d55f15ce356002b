"""Server-Sent Events of one conversation, resumable with Last-Event-ID (see stream_cursor)."""

from __future__ import annotations

from aiohttp import web

from channels.base import ChannelHost
from channels.sse import resume_token, stream_events
from channels.stream_cursor import StreamCursor


async def stream_conversation(
    request: web.Request, host: ChannelHost, conversation_id: int
) -> web.StreamResponse:
    cursor = StreamCursor.parse(resume_token(request), await host.resume_point(conversation_id))
    return await stream_events(request, host, conversation_id, cursor)
