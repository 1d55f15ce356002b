"""The WeChat Official Account channel (`wechat`): callbacks, the 5-second window, and the
customer-service message API.

GET  <path>   URL verification: echo `echostr` when the signature matches the Token.
POST <path>   a message or event, in plaintext, compatible or safe (AES) mode.

Every message is stored before the callback is answered. The request then waits, up to the
account's passive budget, for the bot's answer to *this* message: if it is ready it is the
passive reply; otherwise the request answers `success` and the answer goes out through the
customer-service API (`message/custom/send`) in sentence-aligned pieces of at most 2,048 bytes,
with "typing" shown meanwhile. WeChat's retries of the message (same MsgId) never start a
second answer: see `passive.AnswerBoard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from aiohttp import web
from prometheus_client import Counter
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException
from wechatpy.parser import parse_message
from wechatpy.replies import TextReply

from channels.base import (
    Capabilities,
    ChannelHost,
    ConversationRef,
    Delivery,
    IngestResult,
    ReplySink,
    StoredMessage,
)
from channels.http import ApiError
from channels.wechat.api import OfficialAccountApi, WechatApiError, WechatTransportError
from channels.wechat.chunks import split_text
from channels.wechat.config import OfficialAccountSettings, WechatSettings
from channels.wechat.delivery import MAX_BYTES, PieceStream, send_pieces
from channels.wechat.inbound import normalize
from channels.wechat.passive import (
    SYSTEM_REPLY,
    AnswerBoard,
    PassiveBoard,
    SystemReplySlot,
    Ticket,
)
from channels.wechat.replay import ReplayGuard
from channels.wechat.runtime import WechatChannelBase, bind, require_signature, signed_params
from channels.wechat.tokens import InProcessTokenStore, TokenStore
from channels.wechat.xmlsafe import read_limited, safe_xml

if TYPE_CHECKING:
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

CHANNEL = "wechat"
SUCCESS = "success"  # tells WeChat "received, no passive reply" (no retry, no error shown)
TYPING_REFRESH_S = 12.0  # WeChat shows "typing" for 15 s after each call
PASSIVE_WRITE_WAIT_S = 3.0  # how long a sink waits to hear that its passive reply went out

REPLIES = Counter(
    "swarmdesk_wechat_replies",
    "WeChat answers by how they reached the shopper",
    ["channel", "route"],  # passive, api, passive+api, undeliverable, failed
)
RETRIES = Counter(
    "swarmdesk_wechat_callback_retries",
    "WeChat callbacks for a message seen before (platform retries)",
    ["channel"],
)


class _Account:
    def __init__(self, s: OfficialAccountSettings, api_base_url: str) -> None:
        self.s = s
        self.name = s.name
        self.mode = s.mode()
        self.token = s.resolve_token()
        aes = s.resolve_aes_key(required=self.mode != "plain")
        self.crypto = WeChatCrypto(self.token, aes, s.appid) if aes else None
        self.secret = s.resolve_secret()
        self.api_base_url = s.api_base_url or api_base_url
        self._api: OfficialAccountApi | None = None

    @property
    def api(self) -> OfficialAccountApi:
        if self._api is None:
            raise RuntimeError("the wechat channel is not started")
        return self._api

    def start(self, http: httpx.AsyncClient, store: TokenStore) -> None:
        self._api = OfficialAccountApi(
            http,
            self.api_base_url,
            account=self.name,
            appid=self.s.appid,
            secret=self.secret,
            store=store,
            stable_token=self.s.token_endpoint == "stable_token",
        )


class OfficialAccountChannel(WechatChannelBase):
    name = CHANNEL
    capabilities = Capabilities(max_length=MAX_BYTES, length_unit="bytes", typing=True)

    def __init__(
        self,
        settings: WechatSettings,
        store: TokenStore | None = None,
        replay: ReplayGuard | None = None,
    ) -> None:
        super().__init__(settings.max_body_bytes)
        self.replay = replay or ReplayGuard()
        self.accounts = {
            a.name: _Account(a, settings.api_base_url) for a in settings.official_accounts
        }
        self._store: TokenStore = store or InProcessTokenStore()
        self.board: PassiveBoard = AnswerBoard()

    def share(self, cluster: RedisParts) -> None:
        # Tokens fetched once for all processes; a nonce seen by one is a replay for all.
        from channels.wechat.redis_tokens import RedisTokenStore
        from channels.wechat.replay import RedisNonceStore

        self._store = RedisTokenStore(cluster.state, cluster.keys)
        self.replay.store = RedisNonceStore(cluster.state, cluster.keys)
        # A retry may reach another process than the one writing the answer.
        from channels.wechat.passive_shared import SharedAnswerBoard

        self.board = SharedAnswerBoard(cluster, spawn=self.spawn)

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        for acc in self.accounts.values():
            app.router.add_get(acc.s.path, bind(self._verify, acc))
            app.router.add_post(acc.s.path, bind(self._receive, acc))

    async def start(self) -> None:
        await super().start()
        for acc in self.accounts.values():
            acc.start(self.http, self._store)
        log.info("wechat_accounts", accounts={a.name: a.s.path for a in self.accounts.values()})
        for acc in self.accounts.values():
            if acc.mode != "safe":
                log.warning(
                    "wechat_not_safe_mode",
                    account=acc.name,
                    mode=acc.mode,
                    detail="callbacks in plain/compatible mode carry unsigned plaintext bodies; "
                    "switch the account to safe mode (安全模式) and set encryption: safe",
                )

    # -- callbacks ---------------------------------------------------------------------------

    async def _verify(self, acc: _Account, request: web.Request) -> web.Response:
        """The URL check WeChat makes when the server address is saved in its console."""
        echo = request.query.get("echostr")
        if echo is None:
            raise ApiError(
                400,
                "missing_parameter",
                "this URL is a WeChat callback: WeChat calls it with signature, timestamp, "
                "nonce and echostr",
            )
        _check_signature(acc, request.query)
        return web.Response(text=echo)

    async def _receive(self, acc: _Account, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        query = request.query
        _, timestamp, nonce = _check_signature(acc, query)
        body = await read_limited(request, self.max_body_bytes)
        await self.replay.check(acc.name, timestamp, nonce, body)
        encrypted = query.get("encrypt_type", "raw").lower() == "aes"
        if encrypted:
            text, raw = _decrypt(acc, query, body)
        elif acc.mode == "safe":
            raise ApiError(
                403,
                "encryption_required",
                "this account is in safe mode: WeChat must send encrypted messages",
            )
        else:
            text, raw = safe_xml(body)
        try:
            msg = parse_message(text)
            norm = normalize(
                CHANNEL,
                acc.name,
                msg,
                raw,
                menu=acc.s.menu,
                media_text=acc.s.media_text,
                welcome_text=acc.s.welcome_text,
            )
        except Exception as e:  # wechatpy raises KeyError/ValueError on odd messages
            # (A fixed text: the exception's words are ours, not the caller's business.)
            raise ApiError(400, "invalid_message", "not a WeChat message") from e

        result = await self.host.ingest(norm.message)
        if result.duplicate:
            RETRIES.labels(CHANNEL).inc()
        reply: str | None = None
        waiter = None
        if norm.action == "answer":
            reply, waiter = await self._await_answer(acc, result, started)
        elif norm.action in ("welcome", "media") and not result.duplicate:
            text = acc.s.welcome_text if norm.action == "welcome" else acc.s.media_text
            reply = await self._system_reply(
                acc, result.conversation_id, norm.message.chat_id, text
            )
        if reply is None:
            return web.Response(text=SUCCESS)
        return await self._write_passive(request, acc, msg, reply, encrypted, waiter)

    async def _await_answer(
        self, acc: _Account, result: IngestResult, started: float
    ) -> tuple[str | None, Ticket | None]:
        conv = await self.host.get_conversation(result.conversation_id)
        if conv is None or conv.owner != "bot":
            return None, None  # a person owns the conversation; they answer through the API
        budget = acc.s.passive_budget_seconds - (asyncio.get_running_loop().time() - started)
        return await self.board.wait(result.message_id, budget)

    async def _system_reply(
        self, acc: _Account, conversation_id: int, chat_id: str, text: str
    ) -> str | None:
        """Store a system message (welcome...) and let this request carry it, if it can."""
        slot = SystemReplySlot(CHANNEL, acc.name, chat_id)
        token = SYSTEM_REPLY.set(slot)
        try:
            await self.host.send_message(conversation_id, text, sender="system")
        finally:
            SYSTEM_REPLY.reset(token)
        return slot.text

    async def _write_passive(
        self,
        request: web.Request,
        acc: _Account,
        msg: Any,
        text: str,
        encrypted: bool,
        waiter: Ticket | None,
    ) -> web.StreamResponse:
        """Write the passive reply now and tell the waiting sink whether it went out."""
        written = False
        try:
            if waiter is not None and not await waiter.begin():
                return web.Response(text=SUCCESS)  # the sink gave up on us: the API has it
            xml = TextReply(message=msg, content=text, time=int(time.time())).render()
            if encrypted:
                assert acc.crypto is not None
                xml = acc.crypto.encrypt_message(
                    xml, request.query.get("nonce", ""), request.query.get("timestamp")
                )
            resp = web.Response(text=xml, content_type="application/xml")
            try:
                await resp.prepare(request)
                await resp.write_eof()
                written = True
            except (ConnectionError, RuntimeError) as e:
                log.warning("wechat_passive_reply_lost", account=acc.name, error=repr(e))
            return resp
        finally:
            if waiter is not None:
                await waiter.report(written)

    # -- replies -----------------------------------------------------------------------------

    def _account(self, name: str) -> _Account:
        acc = self.accounts.get(name)
        if acc is None:
            raise LookupError(f"no official account named {name!r} is configured")
        return acc

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        return _OaSink(self, self._account(conversation.account), conversation, inbound)

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        acc = self.accounts.get(conversation.account)
        if acc is None:
            return Delivery(ok=False, detail=f"no official account {conversation.account!r}")
        slot = SYSTEM_REPLY.get()
        if slot is not None and slot.take(CHANNEL, acc.name, conversation.chat_id, text, MAX_BYTES):
            REPLIES.labels(CHANNEL, "passive").inc()
            return Delivery(platform_message_ids=["passive"])
        delivery = await self.send_api(acc, conversation.chat_id, text)
        REPLIES.labels(CHANNEL, _route(delivery, passive=False)).inc()
        return delivery

    async def agent_typing(self, conversation: ConversationRef) -> None:
        acc = self.accounts.get(conversation.account)
        if acc is not None and acc.s.typing:
            with contextlib.suppress(WechatApiError, WechatTransportError):
                await acc.api.typing(conversation.chat_id, True)  # only a hint

    async def send_api(
        self, acc: _Account, openid: str, text: str, ids: list[str] | None = None
    ) -> Delivery:
        return await send_pieces(lambda piece: acc.api.send_text(openid, piece), text, sent=ids)


def _route(d: Delivery, *, passive: bool) -> str:
    if d.undeliverable:
        return "undeliverable"
    if not d.ok:
        return "failed"
    return "passive+api" if passive else "api"


class _OaSink(ReplySink):
    """One answer: passive if a callback request is still waiting for it, else the API."""

    def __init__(
        self,
        channel: OfficialAccountChannel,
        acc: _Account,
        conversation: ConversationRef,
        inbound: StoredMessage,
    ) -> None:
        self._ch = channel
        self._acc = acc
        self._board = channel.board
        self._openid = conversation.chat_id
        self._id = inbound.id
        self._pieces = PieceStream(
            lambda text, ids: channel.send_api(acc, self._openid, text, ids),
            channel=CHANNEL,
            account=acc.name,
        )
        self._typing: asyncio.Task[None] | None = None
        self._typed = False
        created = inbound.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        # The first callback's window ends about this time (wall clock); retries add theirs.
        self._window_end = created.timestamp() + acc.s.passive_budget_seconds
        self._board.expect(self._id)

    async def _window_passed(self) -> bool:
        if time.time() < self._window_end:
            return False
        return await self._board.window_left(self._id) is None

    async def typing(self) -> None:
        if self._acc.s.typing:
            self._typing = self._ch.spawn(self._keep_typing())

    async def _keep_typing(self) -> None:
        # Within the window the answer itself is the reply; "typing" only once it has passed.
        delay = self._window_end - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:  # a retry may have opened a new window meanwhile
            left = await self._board.window_left(self._id)
            if left is None:
                break
            await asyncio.sleep(left + 0.05)
        while True:
            try:
                await self._acc.api.typing(self._openid, True)
                self._typed = True
            except (WechatApiError, WechatTransportError) as e:
                log.info("wechat_typing_refused", account=self._acc.name, error=str(e))
                return
            await asyncio.sleep(TYPING_REFRESH_S)

    async def _stop_typing(self) -> None:
        task, self._typing = self._typing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def push(self, delta: str) -> None:
        if not self._pieces.add(delta) or not await self._window_passed():
            return
        # A full piece is ready and nobody waits for a passive reply: send it now rather
        # than at the end.
        pieces = self._pieces.full_pieces()
        if pieces:
            await self._board.to_api(self._id)
            await self._pieces.send_full(pieces)

    def shown(self) -> bool:
        # Nothing is seen before the passive reply or the first customer-service piece.
        return bool(self._pieces.sent)

    def retract(self) -> None:
        self._pieces.clear()

    async def finish(self, final_text: str) -> Delivery:
        await self._stop_typing()
        failure = self._pieces.failure
        if failure is not None:
            await self._board.abandon(self._id)
            REPLIES.labels(CHANNEL, _route(failure, passive=False)).inc()
            return failure
        if self._pieces.sent:
            rest = self._pieces.unsent(final_text)
            return self._count(await self._pieces.send(rest), passive=False)
        pieces = split_text(final_text, MAX_BYTES)
        if not pieces:
            await self._board.abandon(self._id)
            return Delivery()
        handover = await self._board.claim(self._id, pieces[0])
        if handover is not None:
            if await handover.delivered(PASSIVE_WRITE_WAIT_S):
                self._pieces.ids.append("passive")
                if len(pieces) == 1:
                    REPLIES.labels(CHANNEL, "passive").inc()
                    return Delivery(platform_message_ids=list(self._pieces.ids))
                return self._count(await self._pieces.send("".join(pieces[1:])), passive=True)
            await self._board.to_api(self._id)  # the passive reply did not go out
        return self._count(await self._pieces.send(final_text), passive=False)

    def _count(self, d: Delivery, *, passive: bool) -> Delivery:
        REPLIES.labels(CHANNEL, _route(d, passive=passive)).inc()
        return d

    async def fail(self, reason: str) -> None:
        await self._stop_typing()
        await self._board.abandon(self._id)
        if self._typed:
            with contextlib.suppress(WechatApiError, WechatTransportError):
                await self._acc.api.typing(self._openid, False)


def _check_signature(acc: _Account, query: Mapping[str, str]) -> tuple[str, str, str]:
    """(signature, timestamp, nonce) of a callback whose signature is right; else 403."""
    sig, ts, nonce = signed_params(query, "signature")
    try:
        require_signature(sig, acc.token, ts, nonce)
    except InvalidSignatureException as e:
        raise ApiError(
            403,
            "invalid_signature",
            "the signature does not match: the Token here must equal the one in the WeChat console",
        ) from e
    return sig, ts, nonce


def _decrypt(acc: _Account, query: Mapping[str, str], body: bytes) -> tuple[str, dict[str, Any]]:
    """The inner message of a safe/compatible-mode callback (checked like any body)."""
    if acc.crypto is None:
        raise ApiError(
            400,
            "encryption_not_configured",
            "the message is encrypted (encrypt_type=aes) but this account has no "
            "aes_key_env; set it to the EncodingAESKey from the WeChat console",
        )
    _, envelope = safe_xml(body)
    if not isinstance(envelope.get("Encrypt"), str):
        raise ApiError(400, "invalid_message", "an encrypted callback needs an <Encrypt> element")
    msg_signature = query.get("msg_signature")
    if not msg_signature:
        raise ApiError(403, "invalid_signature", "msg_signature is required with encrypt_type=aes")
    try:
        require_signature(
            msg_signature, acc.token, query["timestamp"], query["nonce"], envelope["Encrypt"]
        )
        inner = acc.crypto.decrypt_message(
            envelope, msg_signature, query["timestamp"], query["nonce"]
        )
    except InvalidSignatureException as e:
        raise ApiError(403, "invalid_signature", "msg_signature does not match") from e
    except InvalidAppIdException as e:
        raise ApiError(403, "wrong_appid", "the message is for another AppID") from e
    except Exception as e:  # bad base64, padding, UTF-8: not something WeChat encrypted
        raise ApiError(
            400, "cannot_decrypt", "cannot decrypt the message; check the EncodingAESKey"
        ) from e
    return safe_xml(str(inner).encode("utf-8"))
