"""The HTTP API channel, for custom integrations (like Chatwoot's API channel).

POST /api/v1/messages                        store a shopper's message, 202 with ids
GET  /api/v1/conversations/{id}/stream       Server-Sent Events of the conversation
GET  /api/v1/conversations/{id}/messages     history, paged by seq
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web

from channels.api.sse import stream_conversation
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
    UnknownConversation,
)
from channels.http import ApiError, parse_id, read_json
from channels.peers import direct_local_caller

CHANNEL = "api"
MAX_TEXT_CHARS = 8000
MAX_ID_CHARS = 255


class ApiChannel(Channel):
    name = CHANNEL
    # Arriving here vouches for no one: the caller names the verified shop user per message.
    capabilities = Capabilities(max_length=MAX_TEXT_CHARS, event_bus_delivery=True)

    def __init__(self, account: str, api_keys: list[str], dev_key: str | None = None) -> None:
        """`dev_key`: the development key, accepted only from a direct loopback caller."""
        self.account = account
        self._keys = [k.encode() for k in api_keys if k]
        self._dev_key = dev_key.encode() if dev_key else None
        self._host: ChannelHost | None = None

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        app.router.add_post("/api/v1/messages", self.post_message)
        app.router.add_get("/api/v1/conversations/{id}/stream", self.stream)
        app.router.add_get("/api/v1/conversations/{id}/messages", self.messages)

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        # Clients read deltas and finals from the event bus; nothing to push elsewhere.
        return NullSink()

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        return Delivery()

    # -- handlers ----------------------------------------------------------------------------

    @property
    def host(self) -> ChannelHost:
        assert self._host is not None
        return self._host

    def _authorize(self, request: web.Request) -> None:
        given = request.headers.get("X-Api-Key", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise ApiError(401, "unauthorized", "send the API key in the X-Api-Key header")
        key = given.encode("utf-8", "replace")
        if self._dev_key is not None and hmac.compare_digest(key, self._dev_key):
            if not direct_local_caller(request):
                raise ApiError(
                    403,
                    "dev_key_not_allowed",
                    "the development key works only from this machine without a proxy; "
                    "set a real API key (channels.api.api_key_env)",
                )
            return
        if not any(hmac.compare_digest(key, k) for k in self._keys):
            raise ApiError(401, "unauthorized", "the API key is not valid")

    async def _conversation(self, request: web.Request) -> ConversationRef:
        self._authorize(request)
        cid = parse_id(request.match_info["id"])
        if cid is None:
            raise ApiError(404, "not_found", "conversation ids are 64-bit integers")
        conv = await self.host.get_conversation(cid)
        if conv is None or conv.channel != CHANNEL or conv.account != self.account:
            raise ApiError(404, "not_found", f"no conversation {cid}")
        return conv

    async def post_message(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await read_json(request)
        contact = _string(body, "contact_id", required=True)
        text = _string(body, "text", required=True, limit=MAX_TEXT_CHARS)
        client_id = _string(body, "client_message_id")
        name = _string(body, "contact_name")
        shop_user = _string(body, "shop_user_id")
        conv_id = body.get("conversation_id")
        if conv_id is not None and (not isinstance(conv_id, int) or isinstance(conv_id, bool)):
            raise ApiError(422, "invalid_field", "conversation_id must be an integer")
        unknown = set(body) - {
            "contact_id",
            "text",
            "client_message_id",
            "contact_name",
            "conversation_id",
            "shop_user_id",
        }
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
        assert contact is not None and text is not None
        if not text.strip():
            raise ApiError(422, "invalid_field", "text must not be blank")
        msg = InboundMessage(
            channel=CHANNEL,
            account=self.account,
            chat_id=contact,
            user_id=contact,
            external_id=client_id,
            text=text,
            user_name=name,
            conversation_id=conv_id,
            raw=body,
            contact_attributes=_identity(shop_user),
        )
        try:
            result = await self.host.ingest(msg)
        except UnknownConversation as e:
            raise ApiError(
                404, "not_found", f"no conversation {conv_id} for contact {contact!r}"
            ) from e
        base = f"/api/v1/conversations/{result.conversation_id}"
        return web.json_response(
            {
                "message_id": result.message_id,
                "conversation_id": result.conversation_id,
                "contact_id": contact,
                "seq": result.seq,
                "duplicate": result.duplicate,
                "stream_url": f"{base}/stream?after={result.seq - 1}",
                "messages_url": f"{base}/messages",
            },
            status=200 if result.duplicate else 202,
        )

    async def messages(self, request: web.Request) -> web.Response:
        conv = await self._conversation(request)
        after = _int_param(request, "after")
        before = _int_param(request, "before")
        limit = _int_param(request, "limit")
        limit = 50 if limit is None else limit
        if not 1 <= limit <= 200:
            raise ApiError(400, "invalid_parameter", "limit must be between 1 and 200")
        rows = await self.host.list_messages(
            conv.id, after_seq=after, before_seq=before, limit=limit + 1
        )
        more = len(rows) > limit
        rows = rows[:limit] if after is not None else rows[-limit:]
        return web.json_response(
            {
                "conversation_id": conv.id,
                "owner": conv.owner,
                "messages": [m.as_json() for m in rows],
                "has_more": more,
            },
            dumps=_dumps,
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        conv = await self._conversation(request)
        return await stream_conversation(request, self.host, conv.id)


def _identity(shop_user: str | None) -> dict[str, Any]:
    """The contact's identity as of this message: the caller (holding the API key) vouches
    for the shop user it names; a message without one is from an anonymous shopper."""
    verified = bool(shop_user and shop_user.strip())
    return {
        "verified": verified,
        "shop_user_id": shop_user if verified else None,
        "identity": "verified" if verified else "anonymous",
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _string(
    body: dict[str, Any], key: str, *, required: bool = False, limit: int = MAX_ID_CHARS
) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(422, "missing_field", f"'{key}' is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool) and key != "text":
        value = str(value)
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", f"'{key}' must be a string")
    if len(value) > limit:
        raise ApiError(422, "invalid_field", f"'{key}' is longer than {limit} characters")
    return value


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    value = parse_id(raw)
    if value is None:
        raise ApiError(400, "invalid_parameter", f"'{name}' must be an integer from 0 to 2^63-1")
    return value
