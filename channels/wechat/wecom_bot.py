"""A WeCom intelligent bot (智能机器人) in API mode: encrypted JSON callbacks, `stream` replies.

The first callback of a message is stored, then answered with a stream (`finish: false`
while the bot writes); WeCom polls the stream (`msgtype: stream`) about once a second and
shows its growing text until a reply says `finish: true`. WeCom stops polling 6 minutes
after the message: an answer not done by `stream_ttl_seconds` closes the stream with
`holding_text` and goes out through the message's one-time `response_url` when ready.
The text of each stream lives in memory, keyed by stream id (with several processes, in
Redis: see wecom_streams.py); a poll for a stream nobody knows (after a restart) is answered
from the stored answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from wechatpy.enterprise.crypto import PrpCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto
from wechatpy.exceptions import InvalidSignatureException
from wechatpy.utils import WeChatSigner, to_text

from channels.base import (
    ConversationRef,
    Delivery,
    InboundMessage,
    ReplySink,
    StoredMessage,
    may_send,
)
from channels.http import ID_LIMIT, ApiError, parse_json_object
from channels.wechat.api import WechatApiError, WechatTransportError, post_response_url
from channels.wechat.chunks import split_text
from channels.wechat.config import WecomBotSettings
from channels.wechat.passive import SYSTEM_REPLY, SystemReplySlot
from channels.wechat.runtime import require_signature, signed_params, verify_echo
from channels.wechat.xmlsafe import read_limited

if TYPE_CHECKING:
    from channels.wechat.runtime import WechatChannelBase
    from channels.wechat.wecom_streams import SharedStreams

log = structlog.get_logger(__name__)

STREAM_MAX_BYTES = 20480  # the most text one stream shows
RESPONSE_URL_TTL_S = 55 * 60  # WeCom's response_url is valid for an hour, once
_STREAM_ID = re.compile(r"^sd(\d+)c(\d+)q(\d+)$")
_MENTION = re.compile(r"^\s*@\S+\s*")
_MEDIA = ("image", "file", "video")


@dataclass(eq=False)
class _Stream:
    id: str
    inbound_id: int
    conversation_id: int
    chat_id: str
    expires: float  # time.monotonic() after which the stream is closed with holding text
    content: str = ""
    final: str | None = None
    closed: bool = False  # closed early with holding text: the answer goes by response_url
    fetched: bool = False  # WeCom has received `finish: true`
    response_url: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.monotonic)


def stream_id(message_id: int, conversation_id: int, seq: int) -> str:
    return f"sd{message_id}c{conversation_id}q{seq}"


class WecomBot:
    kind = "bot"

    def __init__(self, s: WecomBotSettings) -> None:
        self.s = s
        self.name = s.name
        self.token = s.resolve_token()
        aes = s.resolve_aes_key(required=True)
        assert aes is not None
        # Bots made inside a company use an empty receive id.
        self.crypto = EnterpriseCrypto(self.token, aes, "")
        self.streams: dict[str, _Stream] = {}
        self._urls: dict[str, tuple[str, float]] = {}  # chat -> latest unused response_url
        self._used_urls: set[str] = set()
        # Several processes (queue.backend: redis): streams live in Redis, see share().
        self.shared: SharedStreams | None = None

    # -- crypto ------------------------------------------------------------------------------

    def _encrypted(self, payload: dict[str, Any], nonce: str) -> web.Response:
        plain = json.dumps(payload, ensure_ascii=False)
        encrypt = to_text(PrpCrypto(self.crypto.key).encrypt(plain, ""))
        timestamp = str(int(time.time()))
        signer = WeChatSigner()
        signer.add_data(self.token, timestamp, nonce, encrypt)
        body = {
            "encrypt": encrypt,
            "msgsignature": signer.signature,
            "timestamp": int(timestamp),
            "nonce": nonce,
        }
        return web.json_response(body)

    async def verify(self, ch: WechatChannelBase, request: web.Request) -> web.Response:
        return verify_echo(self.crypto, request.query)

    # -- callbacks ---------------------------------------------------------------------------

    async def receive(self, ch: WechatChannelBase, request: web.Request) -> web.Response:
        sig, ts, nonce = signed_params(request.query)
        body = await read_limited(request, ch.max_body_bytes)
        envelope = parse_json_object(body)
        encrypt = envelope.get("encrypt")
        if not isinstance(encrypt, str) or not encrypt:
            raise ApiError(400, "invalid_message", 'a WeCom bot callback is {"encrypt": ...}')
        try:
            require_signature(sig, self.token, ts, nonce, encrypt)
            inner = self.crypto.decrypt_message({"Encrypt": encrypt}, sig, ts, nonce)
        except InvalidSignatureException as e:
            raise ApiError(403, "invalid_signature", "msg_signature does not match") from e
        except Exception as e:
            raise ApiError(400, "cannot_decrypt", "cannot decrypt; check the key") from e
        msg = parse_json_object(str(inner).encode("utf-8"))
        reply_nonce = secrets.token_hex(8)
        if msg.get("msgtype") == "stream":
            return self._encrypted(await self._poll(ch, msg), reply_nonce)
        try:
            inbound, action = self._normalize(ch.name, msg)
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # (odd shapes of fields)
            raise ApiError(400, "invalid_message", "not a WeCom bot message") from e
        result = await ch.host.ingest(inbound)
        url = msg.get("response_url")
        if isinstance(url, str) and url and not result.duplicate:
            self._urls[inbound.chat_id] = (url, time.monotonic())
            if self.shared is not None:  # an agent's message may be sent by another process
                await self.shared.remember_url(self, inbound.chat_id, url)
        sid = stream_id(result.message_id, result.conversation_id, result.seq)
        if action == "answer" and self.shared is not None:
            own_url = url if isinstance(url, str) else ""
            reply = await self.shared.callback(self, sid, own_url, self.s.passive_budget_seconds)
            return self._encrypted(reply, reply_nonce)
        if action == "answer":
            stream = self._stream(sid, result.message_id, result.conversation_id, inbound.chat_id)
            if isinstance(url, str) and url and stream.response_url is None:
                stream.response_url = url
            if stream.final is None and self.s.passive_budget_seconds > 0:
                try:
                    await asyncio.wait_for(stream.ready.wait(), self.s.passive_budget_seconds)
                except TimeoutError:
                    pass
            return self._encrypted(self._render(stream), reply_nonce)
        if action in ("welcome", "media") and not result.duplicate:
            text = self.s.welcome_text if action == "welcome" else self.s.media_text
            slot = SystemReplySlot(ch.name, self.name, inbound.chat_id)
            token = SYSTEM_REPLY.set(slot)
            try:
                await ch.host.send_message(result.conversation_id, text, sender="system")
            finally:
                SYSTEM_REPLY.reset(token)
            if slot.text is not None:
                if action == "welcome":
                    payload = {"msgtype": "text", "text": {"content": slot.text}}
                else:
                    payload = _stream_payload(sid, True, slot.text)
                return self._encrypted(payload, reply_nonce)
        return web.Response(text="")

    def _normalize(self, channel: str, msg: dict[str, Any]) -> tuple[InboundMessage, str]:
        kind = str(msg.get("msgtype") or "unknown")
        sender = msg.get("from") or {}
        user = str(sender.get("userid") or "")
        if not user:
            raise ValueError("from.userid is missing")
        group = msg.get("chattype") == "group"
        chat = str(msg.get("chatid") or user) if group else user
        msgid = str(msg.get("msgid") or "")
        text = ""
        attachments: list[dict[str, Any]] = []
        action = "answer"
        if kind == "text":
            text = str((msg.get("text") or {}).get("content") or "")
        elif kind == "voice":  # WeCom sends the transcript
            text = str((msg.get("voice") or {}).get("content") or "")
        elif kind == "mixed":
            items = (msg.get("mixed") or {}).get("msg_item") or []
            parts = []
            for item in items:
                if item.get("msgtype") == "text":
                    parts.append(str((item.get("text") or {}).get("content") or ""))
                else:
                    attachments.append({"type": str(item.get("msgtype")), **_media(item)})
            text = "\n".join(p for p in parts if p)
        elif kind in _MEDIA:
            attachments.append({"type": kind, **_media(msg)})
            action = "media" if self.s.media_text else "silent"
        elif kind == "event":
            event = str((msg.get("event") or {}).get("eventtype") or "")
            kind = f"event:{event}" if event else "event"
            action = "welcome" if event == "enter_chat" and self.s.welcome_text else "silent"
        else:
            action = "silent"
        if group:
            text = _MENTION.sub("", text, count=1)
        if action == "answer" and not text.strip():
            action = "silent"
        if not msgid:
            msgid = f"{user}:{msg.get('create_time', '')}:{kind}"
        stored = {k: v for k, v in msg.items() if k != "response_url"}  # a one-time secret
        return (
            InboundMessage(
                channel=channel,
                account=self.name,
                chat_id=chat,
                user_id=user,
                external_id=msgid,
                kind=kind,
                text=text,
                attachments=attachments,
                raw=stored,
                answer=action == "answer",
            ),
            action,
        )

    # -- streams -----------------------------------------------------------------------------

    def _stream(self, sid: str, inbound_id: int, conversation_id: int, chat_id: str) -> _Stream:
        stream = self.streams.get(sid)
        if stream is None:
            self._prune()
            stream = self.streams[sid] = _Stream(
                sid,
                inbound_id,
                conversation_id,
                chat_id,
                expires=time.monotonic() + self.s.stream_ttl_seconds,
            )
        return stream

    def _prune(self) -> None:
        cutoff = time.monotonic() - self.s.stream_ttl_seconds - 120
        for sid in [k for k, s in self.streams.items() if s.created < cutoff]:
            del self.streams[sid]
        now = time.monotonic()
        for chat in [c for c, (_, t) in self._urls.items() if now - t > RESPONSE_URL_TTL_S]:
            del self._urls[chat]
        if len(self._used_urls) > 10_000:
            self._used_urls.clear()

    async def _poll(self, ch: WechatChannelBase, msg: dict[str, Any]) -> dict[str, Any]:
        polled = msg.get("stream")
        sid = str(polled.get("id") or "") if isinstance(polled, dict) else ""
        if self.shared is not None and sid:
            shown = await self.shared.view(self, sid)
            if shown is not None:
                return shown
        stream = self.streams.get(sid) or await self._recover(ch, sid)
        if stream is None:
            return _stream_payload(sid, True, "")  # unknown stream: stop polling
        return self._render(stream)

    async def _recover(self, ch: WechatChannelBase, sid: str) -> _Stream | None:
        """A stream from before a restart: its stored answer, or a stream the recovering
        worker will fill."""
        m = _STREAM_ID.match(sid)
        if m is None:
            return None
        inbound_id, conversation_id, seq = (int(g) for g in m.groups())
        if max(inbound_id, conversation_id, seq) >= ID_LIMIT:
            return None  # not an id we made: the database would refuse it
        conv = await ch.host.get_conversation(conversation_id)
        if conv is None or conv.channel != ch.name or conv.account != self.name:
            return None
        stream = self._stream(sid, inbound_id, conversation_id, conv.chat_id)
        for row in await ch.host.list_messages(conversation_id, after_seq=seq, limit=50):
            if row.reply_to_id == inbound_id and row.status in ("sent", "pending"):
                stream.final = row.text
                stream.ready.set()
        return stream

    def _render(self, stream: _Stream) -> dict[str, Any]:
        if stream.final is None and not stream.closed and time.monotonic() >= stream.expires:
            stream.closed = True  # WeCom stops polling soon: close now, deliver later
            log.info("wecom_stream_closed_early", account=self.name, stream=stream.id)
        if stream.final is not None and not stream.closed:
            stream.fetched = True
        return self.stream_view(stream.id, stream.content, stream.final, stream.closed)

    def stream_view(
        self, sid: str, content: str, final: str | None, closed: bool
    ) -> dict[str, Any]:
        """What a poll shows: the answer when done, the holding text when the stream was
        closed before it, else the text so far."""
        if final is not None and not closed:
            return _stream_payload(sid, True, _first(final))
        if closed:
            shown = content.rstrip()
            text = f"{shown}\n\n{self.s.holding_text}" if shown else self.s.holding_text
            return _stream_payload(sid, True, _first(text))
        return _stream_payload(sid, False, _first(content))

    # -- sending -----------------------------------------------------------------------------

    def take_url(self, chat_id: str, preferred: str | None = None) -> str | None:
        """An unused response_url for this chat (the message's own first)."""
        if preferred and preferred not in self._used_urls:
            self._used_urls.add(preferred)
            return preferred
        entry = self._urls.pop(chat_id, None)
        if entry is None or time.monotonic() - entry[1] > RESPONSE_URL_TTL_S:
            return None
        if entry[0] in self._used_urls:
            return None
        self._used_urls.add(entry[0])
        return entry[0]

    async def take_any_url(self, chat_id: str, preferred: str | None = None) -> str | None:
        """`take_url`, among all processes when they share (each URL works once)."""
        if self.shared is not None:
            taken = await self.shared.take_url(self, chat_id, preferred)
            if taken is not False:
                return taken
        return self.take_url(chat_id, preferred)  # (also while Redis is unreachable)

    async def after_stream(
        self,
        ch: WechatChannelBase,
        sid: str,
        chat_id: str,
        url: str | None,
        final_text: str,
        shown: bool,
    ) -> Delivery:
        """Deliver what the stream does not show: the rest of a long answer, or all of it
        when the stream was closed first — through the message's response_url."""
        if shown:
            rest = split_text(final_text, STREAM_MAX_BYTES)[1:]
            if not rest:
                return Delivery(platform_message_ids=[sid])
            # Longer than a stream shows: the rest through the message's response_url.
            d = await self.post(ch, await self.take_any_url(chat_id, url), "".join(rest))
            d.platform_message_ids = [sid, *d.platform_message_ids]
            return d
        return await self.post(ch, await self.take_any_url(chat_id, url), final_text)

    async def post(self, ch: WechatChannelBase, url: str | None, text: str) -> Delivery:
        if url is None:
            return Delivery(
                ok=False,
                undeliverable=True,
                detail="a WeCom bot can write only in reply to a member's message (within an "
                "hour, once per message); nothing is open for this chat",
            )
        try:
            await post_response_url(ch.http, url, text)
        except (WechatApiError, WechatTransportError) as e:
            log.error("wecom_response_url_failed", account=self.name, error=str(e))
            return Delivery(ok=False, detail=str(e))
        return Delivery(platform_message_ids=["response_url"])

    async def send(
        self, ch: WechatChannelBase, conversation: ConversationRef, text: str
    ) -> Delivery:
        slot = SYSTEM_REPLY.get()
        if slot is not None and slot.take(
            ch.name, self.name, conversation.chat_id, text, STREAM_MAX_BYTES
        ):
            return Delivery(platform_message_ids=["passive"])
        return await self.post(ch, await self.take_any_url(conversation.chat_id), text)

    def open_reply(
        self, ch: WechatChannelBase, conversation: ConversationRef, inbound: StoredMessage
    ) -> ReplySink:
        sid = stream_id(inbound.id, conversation.id, inbound.seq)
        if self.shared is not None:
            return self.shared.sink(self, ch, sid, conversation.chat_id)
        stream = self._stream(sid, inbound.id, conversation.id, conversation.chat_id)
        return _BotSink(self, ch, stream)


class _BotSink(ReplySink):
    def __init__(self, bot: WecomBot, ch: WechatChannelBase, stream: _Stream) -> None:
        self._bot = bot
        self._ch = ch
        self._stream = stream

    async def push(self, delta: str) -> None:
        s = self._stream
        if s.final is None and not s.closed and may_send():
            s.content += delta  # the next poll shows it (unless a person took over)

    async def finish(self, final_text: str) -> Delivery:
        s = self._stream
        if not may_send():
            return Delivery(ok=False, detail="a person took the conversation over")
        shown = not s.closed and time.monotonic() < s.expires
        if shown:
            s.final = final_text
            s.ready.set()
        else:
            s.closed = True
        return await self._bot.after_stream(
            self._ch, s.id, s.chat_id, s.response_url, final_text, shown
        )

    async def fail(self, reason: str) -> None:
        s = self._stream
        if s.final is None:
            s.final = s.content  # close the stream on what is already shown
            s.ready.set()


def _first(text: str) -> str:
    pieces = split_text(text, STREAM_MAX_BYTES)
    return pieces[0] if pieces else ""


def _stream_payload(sid: str, finish: bool, content: str) -> dict[str, Any]:
    return {"msgtype": "stream", "stream": {"id": sid, "finish": finish, "content": content}}


def _media(item: dict[str, Any]) -> dict[str, Any]:
    body = item.get(str(item.get("msgtype"))) or {}
    return {"url": str(body.get("url") or "")} if isinstance(body, dict) else {}
