"""The web chat widget channel: one script tag on a shop's pages (DESIGN.md, Streaming).

GET  /widget/v1/widget.js, widget.css     the widget (plain JS + CSS, shadow DOM)
GET  /widget/v1/sites/{key}               the site's texts and looks (CORS)
GET  /widget/v1/ws?site=KEY               WebSocket: hello, send; events streamed back
GET  /widget/v1/events?site=KEY&token=... Server-Sent Events fallback (resumable)
POST /widget/v1/messages?site=KEY         send a message without a WebSocket
POST /widget/v1/uploads?site=KEY          an image attachment (raw body)
GET  /widget/v1/files/{name}              a stored image
GET  /                                    the demo shop page (channels.widget.demo_site)

A visitor is the browser's random token (localStorage); chat_id and contact are the token's
hash. Each message carries a client-made id, the idempotency key: a resend after a
reconnect is acknowledged and never answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import WSCloseCode, web

from channels.base import (
    Capabilities,
    Channel,
    ChannelHost,
    ConversationRef,
    Delivery,
    InboundMessage,
    NullSink,
    ReplySink,
    StoredMessage,
)
from channels.http import ApiError, error_response, parse_id, read_json
from channels.sse import resume_token, stream_events
from channels.stream_cursor import StreamCursor
from channels.widget import metrics
from channels.widget.assets import Assets
from channels.widget.config import WidgetSettings
from channels.widget.identity import Visitor, resolve_identity, sign, valid_token, visitor_id
from channels.widget.limits import WidgetLimits, client_ip
from channels.widget.protocol import ProtocolError, Send, dumps, parse_send
from channels.widget.sites import Site, Sites, cors_headers
from channels.widget.socket import SocketSession
from channels.widget.uploads import FILES_PATH, Uploads

if TYPE_CHECKING:
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

CHANNEL = "widget"
API = "/widget/v1"
HARD_FRAME_CAP = 1024 * 1024  # aiohttp closes the socket (1009) above this

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WidgetChannel(Channel):
    name = CHANNEL
    capabilities = Capabilities(typing=True, event_bus_delivery=True)

    def __init__(self, settings: WidgetSettings) -> None:
        self.settings = settings
        demo_signs_in = settings.demo_site if settings.demo_shopper else None
        self.sites = Sites(settings.sites, ephemeral_secret_for=demo_signs_in)
        att = settings.attachments
        self.uploads = Uploads(att.dir, att.max_bytes, list(att.types))
        self.assets = Assets(self._demo_site(), self._demo_visitor())
        self.limits = WidgetLimits(settings.rate_limits, att)
        self._sweeper: asyncio.Task[None] | None = None
        self.sessions: set[SocketSession] = set()
        self.closing = False
        self._host: ChannelHost | None = None

    def _demo_site(self) -> str | None:
        key = self.settings.demo_site
        return key if key is not None and self.sites.get(key) is not None else None

    def _demo_visitor(self) -> tuple[str, str] | None:
        """(shop user id, its hash) the demo page signs its visitors in with."""
        key, user = self._demo_site(), self.settings.demo_shopper
        site = self.sites.get(key) if key is not None else None
        if site is None or user is None or site.secret is None:
            return None
        return user, sign(site.secret, user)

    # -- Channel ----------------------------------------------------------------------------

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        r = app.router
        r.add_get(f"{API}/widget.js", self.assets.handler("widget.js"))
        r.add_get(f"{API}/widget.css", self.assets.handler("widget.css"))
        r.add_get(f"{API}/sites/{{key}}", self._cors(self.site_config))
        r.add_get(f"{API}/ws", self._cors(self.websocket))
        r.add_get(f"{API}/events", self._cors(self.events))
        r.add_post(f"{API}/messages", self._cors(self.post_message))
        r.add_post(f"{API}/uploads", self._cors(self.upload))
        r.add_get(f"{FILES_PATH}/{{name}}", self.uploads.serve)
        r.add_route("OPTIONS", f"{API}/{{tail:.*}}", self.preflight)
        if self._demo_site() is not None:
            r.add_get("/", self.assets.handler("demo.html", cache="no-cache"))
        app.on_shutdown.append(self._on_shutdown)

    def share(self, cluster: RedisParts) -> None:
        from channels.widget.shared_limits import SharedWidgetLimits

        self.limits = SharedWidgetLimits(
            self.settings.rate_limits, self.settings.attachments, cluster
        )

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        # Pages read deltas and finals from the event bus; nothing else to push.
        return NullSink()

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        # The pipeline published the stored message; open pages show it, others on return.
        return Delivery()

    async def start(self) -> None:
        await self.assets.load()
        await self.limits.start()
        if self.settings.attachments.enabled:
            self._sweeper = asyncio.create_task(self._sweep_orphans(), name="widget-orphans")
        js, css = self.assets.sizes()["widget.js"], self.assets.sizes()["widget.css"]
        log.info(
            "widget_ready",
            sites=[s.key for s in self.settings.sites],
            demo_page="/" if self._demo_site() else None,
            gzipped_bytes=js[1] + css[1],
        )

    async def close(self) -> None:
        await self._on_shutdown(None)

    async def _sweep_orphans(self) -> None:
        """Delete uploads no message attached within `orphan_seconds`, every so often."""
        age = self.settings.attachments.orphan_seconds
        while True:
            await asyncio.sleep(min(age / 2, 600))
            try:
                removed = await self.uploads.sweep(age)
            except OSError as e:
                log.warning("widget_orphan_sweep_failed", error=str(e))
                continue
            if removed:
                log.info("widget_orphans_deleted", files=removed)

    async def _on_shutdown(self, app: web.Application | None) -> None:
        self.closing = True
        await self.limits.close()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        sessions = list(self.sessions)
        await asyncio.gather(
            *(
                s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"service restarting")
                for s in sessions
            ),
            return_exceptions=True,
        )

    @property
    def host(self) -> ChannelHost:
        assert self._host is not None
        return self._host

    # -- what every transport shares --------------------------------------------------------

    def visitor(self, site: Site, token: object, user: object, ip: str) -> Visitor:
        if not valid_token(token):
            raise ProtocolError(
                "invalid_token", "the visitor token must be 22-128 letters, digits, '-' or '_'"
            )
        assert isinstance(token, str)
        identity = resolve_identity(user, site.secret)
        if identity.problem:
            log.warning("widget_identity_not_verified", site=site.key, problem=identity.problem)
        return Visitor(site, visitor_id(site.key, token), identity, ip)

    async def visitor_conversation(
        self, visitor: Visitor, conversation_id: int | None
    ) -> int | None:
        """The conversation the page remembers, if it is this visitor's (else None)."""
        if conversation_id is None:
            return None
        conv = await self.host.get_conversation(conversation_id)
        if (
            conv is None
            or conv.channel != CHANNEL
            or conv.account != visitor.site.key
            or conv.chat_id != visitor.id
        ):
            return None
        return conv.id

    async def history_base(self, conversation_id: int) -> int:
        """The watermark a fresh page starts from: it gets the last `history_messages`."""
        n = self.settings.history_messages
        rows = await self.host.list_messages(conversation_id, limit=n, complete_only=True)
        return rows[0].seq - 1 if len(rows) >= n else 0

    async def accept(self, visitor: Visitor, send: Send) -> dict[str, Any]:
        """Store a visitor's message (rate limits, attachments checked) and say so."""
        wait = await self.limits.message_wait(visitor.id, visitor.ip)
        if wait > 0:
            raise ProtocolError(
                "rate_limited",
                f"too many messages; wait {math.ceil(wait)} s and send again",
                send.client_id,
                status=429,
                retry_after=wait,
            )
        attachments: list[dict[str, Any]] = []
        if send.attachments and not self.settings.attachments.enabled:
            raise ProtocolError(
                "attachments_disabled", "this site does not take attachments", send.client_id
            )
        for upload_id in send.attachments:
            found = await self.uploads.lookup(upload_id)
            if found is None:
                raise ProtocolError(
                    "unknown_attachment",
                    "upload the image first (POST /widget/v1/uploads) and send its id",
                    send.client_id,
                    status=422,
                )
            attachments.append(found)
        for found in attachments:
            await self.uploads.attach(found["id"])
        await self.limits.message_taken(visitor.id, visitor.ip)
        ident = visitor.identity
        result = await self.host.ingest(
            InboundMessage(
                channel=CHANNEL,
                account=visitor.site.key,
                chat_id=visitor.id,
                user_id=visitor.id,
                external_id=f"{visitor.id}:{send.client_id}",
                kind="image" if attachments and not send.text.strip() else "text",
                text=send.text,
                attachments=attachments,
                user_name=ident.name,
                raw={"client_id": send.client_id, "identity": ident.attributes(visitor.site.key)},
                contact_attributes=ident.attributes(visitor.site.key),
            )
        )
        return {
            "type": "ack",
            "client_id": send.client_id,
            "message_id": result.message_id,
            "conversation_id": result.conversation_id,
            "seq": result.seq,
            "duplicate": result.duplicate,
            "verified": ident.verified,
        }

    # -- HTTP handlers ----------------------------------------------------------------------

    def _cors(self, handler: Handler) -> Handler:
        """CORS headers on every answer, errors included, so the page can show the reason."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                resp = await handler(request)
            except ApiError as e:
                metrics.REFUSED.labels(e.code).inc()
                resp = e.response()
            except ProtocolError as e:
                metrics.REFUSED.labels(e.code).inc()
                resp = error_response(e.status, e.code, e.detail)
                if e.retry_after is not None:
                    resp.headers["Retry-After"] = str(math.ceil(e.retry_after))
            if not resp.prepared:
                resp.headers.update(cors_headers(request))
            return resp

        return wrapped

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=cors_headers(request))

    async def site_config(self, request: web.Request) -> web.Response:
        site = self.sites.resolve(request, request.match_info["key"])
        s, att = site.settings, self.settings.attachments
        return web.json_response(
            {
                "site": s.key,
                "name": s.name,
                "title": s.title,
                "greeting": s.greeting,
                "quick_replies": s.quick_replies,
                "colour": s.colour,
                "position": s.position,
                "locale": s.locale,
                "max_text_chars": self.settings.max_text_chars,
                "attachments": {
                    "enabled": att.enabled,
                    "max_bytes": att.max_bytes,
                    "types": [f"image/{t}" for t in att.types],
                },
                "identity": site.secret is not None,
            },
            dumps=dumps,
        )

    def _ip(self, request: web.Request) -> str:
        rl = self.settings.rate_limits
        return client_ip(request, rl.trust_forwarded_for, rl.proxy_hops)

    def _too_many_connections(self) -> ApiError:
        return ApiError(
            429,
            "too_many_connections",
            f"at most {self.limits.per_ip} open chats per address; close some tabs",
        )

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        site = self.sites.resolve(request)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat_seconds, max_msg_size=HARD_FRAME_CAP, compress=False
        )
        if not ws.can_prepare(request).ok:
            raise ApiError(
                400,
                "websocket_expected",
                f"connect with a WebSocket, or use {API}/events (Server-Sent Events)",
            )
        ip = self._ip(request)
        seat = await self.limits.connect(ip)
        if seat is None:
            raise self._too_many_connections()
        try:
            await ws.prepare(request)
            session = SocketSession(self, request, ws, site, ip)
            self.sessions.add(session)
            metrics.CONNECTIONS.labels("websocket").inc()
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
                metrics.CONNECTIONS.labels("websocket").dec()
                if not ws.closed:
                    with contextlib.suppress(ConnectionError):
                        await ws.close()
        finally:
            await self.limits.disconnect(seat)
        return ws

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The SSE fallback: one conversation's events (the page POSTs what it sends)."""
        site = self.sites.resolve(request)
        visitor = self.visitor(site, request.query.get("token"), None, self._ip(request))
        raw_conv = request.query.get("conversation_id", "")
        conv_id = await self.visitor_conversation(visitor, parse_id(raw_conv))
        headers = cors_headers(request)
        if conv_id is None:
            # Nothing to follow until the visitor's first message opens a conversation.
            body = "retry: 60000\n\nevent: ready\ndata: " + dumps(
                {"type": "ready", "conversation_id": None, "from": 0}
            )
            return web.Response(
                text=body + "\n\n",
                content_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **headers},
            )
        token = resume_token(request)
        base = await self.history_base(conv_id) if token is None else 0
        cursor = StreamCursor.parse(token, base)
        seat = await self.limits.connect(visitor.ip)
        if seat is None:
            raise self._too_many_connections()
        ready = dumps(
            {
                "type": "ready",
                "conversation_id": conv_id,
                "from": cursor.watermark,
                "verified": False,
            }
        )
        metrics.CONNECTIONS.labels("sse").inc()
        try:
            return await stream_events(
                request,
                self.host,
                conv_id,
                cursor,
                headers=headers,
                preamble=f"event: ready\ndata: {ready}\n\n".encode(),
            )
        finally:
            metrics.CONNECTIONS.labels("sse").dec()
            await self.limits.disconnect(seat)

    async def post_message(self, request: web.Request) -> web.Response:
        site = self.sites.resolve(request)
        body = await read_json(request)
        visitor = self.visitor(site, body.get("token"), body.get("user"), self._ip(request))
        send = parse_send(body, self.settings.max_text_chars)
        ack = await self.accept(visitor, send)
        return web.json_response(ack, status=200 if ack["duplicate"] else 202, dumps=dumps)

    async def upload(self, request: web.Request) -> web.Response:
        site = self.sites.resolve(request)
        if not self.settings.attachments.enabled:
            raise ApiError(403, "attachments_disabled", "this site does not take attachments")
        visitor = self.visitor(site, request.headers.get("X-Widget-Token"), None, self._ip(request))
        wait = await self.limits.upload_wait(visitor.ip)
        if wait > 0:
            raise ProtocolError(
                "rate_limited",
                f"too many uploads; wait {math.ceil(wait)} s",
                status=429,
                retry_after=wait,
            )
        # What the visitor's and the site's daily upload quotas have left.
        room = await self.limits.upload_room(visitor.id, site.key)
        await self.limits.upload_taken(visitor.ip)
        stored = await self.uploads.receive(request, max_bytes=max(room, 0))
        await self.limits.uploaded(visitor.id, site.key, stored["size"])
        log.info("widget_upload", site=site.key, id=stored["id"], size=stored["size"])
        return web.json_response(stored, status=201, dumps=dumps)

    # -- tests ------------------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Cut every socket without a close frame, as a lost network would."""
        sessions = list(self.sessions)
        for s in sessions:
            s.drop()
        return len(sessions)
