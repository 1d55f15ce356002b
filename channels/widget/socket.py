"""One visitor's WebSocket: hello, then the conversation's events out and messages in.

The socket has two writers (this session answering frames, and the pump forwarding the
conversation's events); one lock keeps their frames whole and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from channels.base import ChannelHost
from channels.replay import follow
from channels.stream_cursor import StreamCursor
from channels.widget import metrics
from channels.widget.config import WidgetSettings
from channels.widget.identity import Visitor
from channels.widget.protocol import (
    ProtocolError,
    Send,
    cursor_for,
    dumps,
    event_frame,
    parse_frame,
    parse_hello,
    parse_send,
    problem_frame,
)
from channels.widget.sites import Site

log = structlog.get_logger(__name__)

HELLO_TIMEOUT_S = 15.0
# Application close codes (4000-4999) the widget understands.
CLOSE_BAD_HELLO = 4400  # fix the integration: the widget shows the reason and stops
CLOSE_RESYNC = 4409  # fell behind the live stream: reconnect and resume
# A fault on our side (the database, a bug): the widget reconnects (with backoff) and resumes.
CLOSE_SERVER_ERROR = int(WSCloseCode.INTERNAL_ERROR)  # 1011


class SocketOwner(Protocol):
    """What a session needs from the widget channel (WidgetChannel is one): the transports'
    shared steps, so this module does not import the channel that imports it."""

    @property
    def settings(self) -> WidgetSettings: ...

    @property
    def host(self) -> ChannelHost: ...

    @property
    def closing(self) -> bool: ...

    def visitor(self, site: Site, token: object, user: object, ip: str) -> Visitor: ...

    async def visitor_conversation(
        self, visitor: Visitor, conversation_id: int | None
    ) -> int | None: ...

    async def history_base(self, conversation_id: int) -> int: ...

    async def accept(self, visitor: Visitor, send: Send) -> dict[str, Any]: ...


class SocketSession:
    def __init__(
        self,
        channel: SocketOwner,
        request: web.Request,
        ws: web.WebSocketResponse,
        site: Site,
        ip: str,
    ) -> None:
        self.channel = channel
        self.request = request
        self.ws = ws
        self.site = site
        self.ip = ip
        self.visitor: Visitor | None = None
        self.conversation_id: int | None = None
        self._lock = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None

    async def send(self, text: str) -> None:
        async with self._lock:
            await self.ws.send_str(text)

    async def run(self) -> None:
        try:
            if await self._hello():
                await self._serve()
        except ConnectionError:
            pass  # the visitor went away while we wrote; the page resumes when it is back
        except Exception:
            log.exception("widget_socket_failed")
            await self._close(CLOSE_SERVER_ERROR, b"server error; reconnect to resume")
        finally:
            await self._stop_pump()

    async def _close(self, code: int, reason: bytes) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.close(code=code, message=reason)

    async def _hello(self) -> bool:
        try:
            msg = await self.ws.receive(timeout=HELLO_TIMEOUT_S)
        except TimeoutError:
            await self.ws.close(code=CLOSE_BAD_HELLO, message=b"no hello frame")
            return False
        if msg.type != WSMsgType.TEXT:
            if msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                await self.ws.close(code=CLOSE_BAD_HELLO, message=b"hello must be a JSON text")
            return False
        try:
            hello = parse_hello(parse_frame(msg.data))
            visitor = self.channel.visitor(self.site, hello.token, hello.user, self.ip)
        except ProtocolError as e:
            metrics.REFUSED.labels(e.code).inc()
            await self.send(e.frame())
            await self.ws.close(code=CLOSE_BAD_HELLO, message=e.detail[:120].encode())
            return False
        self.visitor = visitor
        conv_id = await self.channel.visitor_conversation(visitor, hello.conversation_id)
        base = 0
        if conv_id is not None and hello.after is None:
            base = await self.channel.history_base(conv_id)
        resume = conv_id is not None and hello.after is not None
        await self.send(
            dumps(
                {
                    "type": "ready",
                    "conversation_id": conv_id,
                    "from": hello.after if resume else base,
                    "verified": visitor.identity.verified,
                    "identity_problem": visitor.identity.problem,
                }
            )
        )
        if conv_id is not None:
            self._follow(conv_id, cursor_for(hello, base))
        return True

    async def _serve(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                metrics.REFUSED.labels("binary_frame").inc()
                await self.send(
                    problem_frame(
                        "binary_not_supported",
                        "send JSON text frames; upload images with POST /widget/v1/uploads",
                    )
                )
            elif msg.type == WSMsgType.ERROR:
                # aiohttp closed the socket already (e.g. a frame over the hard size cap,
                # close code 1009 with the reason): the client reconnects and resumes.
                metrics.REFUSED.labels("socket_error").inc()
                log.info("widget_socket_error", error=str(self.ws.exception()))
                break

    async def _on_text(self, data: str) -> None:
        limit = self.channel.settings.max_frame_bytes
        if len(data) > limit or len(data.encode()) > limit:
            metrics.REFUSED.labels("frame_too_large").inc()
            await self.send(
                problem_frame(
                    "frame_too_large",
                    f"frames may be at most {limit} bytes; this one was not read",
                )
            )
            return
        try:
            frame = parse_frame(data)
            kind = frame["type"]
            if kind == "send":
                send = parse_send(frame, self.channel.settings.max_text_chars)
                await self._accept(send)
            elif kind == "ping":
                await self.send('{"type":"pong"}')
            elif kind == "hello":
                raise ProtocolError("already_hello", "hello is sent once per connection")
            else:
                raise ProtocolError("unknown_type", f"unknown frame type '{kind[:40]}'")
        except ProtocolError as e:
            metrics.REFUSED.labels(e.code).inc()
            await self.send(e.frame())

    async def _accept(self, send: Send) -> None:
        assert self.visitor is not None
        ack = await self.channel.accept(self.visitor, send)
        conv_id = int(ack["conversation_id"])
        if conv_id != self.conversation_id:
            # The visitor's first message, or a new conversation after the last was closed.
            await self.send(dumps({"type": "conversation", "conversation_id": conv_id}))
            await self._stop_pump()
            self._follow(conv_id, StreamCursor(watermark=0))
        await self.send(dumps(ack))

    # -- the pump: conversation events -> socket ---------------------------------------------

    def _follow(self, conversation_id: int, cursor: StreamCursor) -> None:
        self.conversation_id = conversation_id
        self._pump = asyncio.create_task(self._run_pump(conversation_id, cursor))

    async def _run_pump(self, conversation_id: int, cursor: StreamCursor) -> None:
        with_time = self.channel.settings.delta_timestamps
        events = follow(self.channel.host, conversation_id, cursor)
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    if ev is None:
                        continue
                    await self.send(event_frame(ev, with_time=with_time))
                    if ev.type == "delta":
                        metrics.DELTA_DELIVERY.observe(time.monotonic() - ev.at)
        except ConnectionError:
            return  # the socket is gone; the handler ends too
        except Exception:
            if self.ws.closed:
                return  # (aiohttp raises RuntimeError writing to a closing socket)
            # Without its pump the socket would stay open and show nothing more: close it.
            log.exception("widget_pump_failed")
            await self._close(CLOSE_SERVER_ERROR, b"server error; reconnect to resume")
            return
        # The bus dropped us (shutdown, or too slow a reader): the client resumes elsewhere.
        await self._close(
            CLOSE_RESYNC if not self.channel.closing else WSCloseCode.SERVICE_RESTART,
            b"reconnect to resume",
        )

    async def _stop_pump(self) -> None:
        task, self._pump = self._pump, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def drop(self) -> None:
        """Cut the connection without a goodbye, like a lost network (tests)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()
