"""A WeCom self-built application (自建应用): encrypted XML callbacks, answers by `message/send`.

GET  <path>   URL verification: decrypt `echostr` (enterprise crypto) and echo it.
POST <path>   a member's message or event, always encrypted; stored, then acknowledged with
              an empty body at once. The answer goes out through `message/send` in pieces of
              at most 2,048 bytes, at most `per_member_per_minute` messages a minute per member
              (in this process, or across all of them through Redis once `share`d).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiolimiter import AsyncLimiter
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto
from wechatpy.enterprise.parser import parse_message

from channels.base import ConversationRef, Delivery, ReplySink, StoredMessage
from channels.http import ApiError
from channels.wechat.api import WecomApi
from channels.wechat.config import WecomAppSettings
from channels.wechat.delivery import PieceSink, send_pieces
from channels.wechat.inbound import normalize
from channels.wechat.runtime import open_wecom_callback, verify_echo
from channels.wechat.tokens import TokenStore
from channels.wechat.xmlsafe import safe_xml
from cluster.limits import Rate, SharedLimits
from cluster.outage import Outage, RedisUnavailable

if TYPE_CHECKING:
    from channels.wechat.runtime import WechatChannelBase
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

_MAX_LIMITERS = 10_000  # members with a rate-limit state kept in memory
_BOOK_AHEAD_S = 600.0  # a place further ahead than this is asked for again later


class WecomApp:
    kind = "app"

    def __init__(self, s: WecomAppSettings, api_base_url: str) -> None:
        self.s = s
        self.name = s.name
        self.token = s.resolve_token()
        aes = s.resolve_aes_key(required=True)
        self.crypto = EnterpriseCrypto(self.token, aes, s.corp_id)
        self.secret = s.resolve_secret()
        self.api_base_url = s.api_base_url or api_base_url
        self._api: WecomApi | None = None
        self._limiters: OrderedDict[str, AsyncLimiter] = OrderedDict()
        # The limit shared by every process (share()); the local limiters serve while
        # Redis is down.
        self._shared: tuple[SharedLimits, Callable[[str], str], Outage] | None = None

    def share(self, cluster: RedisParts) -> None:
        keys = cluster.keys
        self._shared = (
            SharedLimits(cluster.state),
            lambda user: keys("wecom_member", self.name, user),
            Outage("wecom_member_limit"),
        )

    def start(self, ch: WechatChannelBase, store: TokenStore) -> None:
        self._api = WecomApi(
            ch.http,
            self.api_base_url,
            account=self.name,
            corp_id=self.s.corp_id,
            agent_id=self.s.agent_id,
            secret=self.secret,
            store=store,
        )

    @property
    def api(self) -> WecomApi:
        if self._api is None:
            raise RuntimeError("the wecom channel is not started")
        return self._api

    # -- callbacks ---------------------------------------------------------------------------

    async def verify(self, ch: WechatChannelBase, request: web.Request) -> web.Response:
        return verify_echo(self.crypto, request.query)

    async def receive(self, ch: WechatChannelBase, request: web.Request) -> web.Response:
        inner = await open_wecom_callback(request, self.crypto, ch.max_body_bytes)
        text, raw = safe_xml(inner.encode("utf-8"))
        try:
            msg = parse_message(text)
            norm = normalize(
                ch.name,
                self.name,
                msg,
                raw,
                media_text=self.s.media_text,
                welcome_text=self.s.welcome_text,
            )
        except Exception as e:
            raise ApiError(400, "invalid_message", "not a WeCom message") from e
        result = await ch.host.ingest(norm.message)
        if norm.action in ("welcome", "media") and not result.duplicate:
            said = self.s.welcome_text if norm.action == "welcome" else self.s.media_text
            # message/send, off the request: WeCom wants the callback answered quickly.
            ch.spawn(ch.host.send_message(result.conversation_id, said, sender="system"))
        return web.Response(text="")  # empty: no passive reply, no retry

    # -- sending -----------------------------------------------------------------------------

    def _limiter(self, user: str) -> AsyncLimiter:
        lim = self._limiters.get(user)
        if lim is None:
            lim = self._limiters[user] = AsyncLimiter(self.s.per_member_per_minute, 60)
            while len(self._limiters) > _MAX_LIMITERS:
                self._limiters.popitem(last=False)
        else:
            self._limiters.move_to_end(user)
        return lim

    async def send_one(self, user: str, piece: str) -> str:
        if self._shared is not None and await self._shared_turn(user):
            return await self.api.send_text(user, piece)
        async with self._limiter(user):  # waits rather than letting WeCom refuse
            return await self.api.send_text(user, piece)

    async def _shared_turn(self, user: str) -> bool:
        """Wait for the member's turn in the limit all processes share (a place reserved in
        one round trip, then waited for); False when Redis cannot be asked (the local
        limiter decides instead)."""
        assert self._shared is not None
        limits, key, outage = self._shared
        rate = Rate(key(user), self.s.per_member_per_minute, 60.0)
        while True:
            try:
                got = await outage.call(limits.admit([(rate, 1)], max_wait=_BOOK_AHEAD_S))
            except RedisUnavailable:
                return False
            await asyncio.sleep(got.wait)  # admitted: our place; refused: a backlog, later
            if got.admitted:
                return True

    async def send_text(self, user: str, text: str, ids: list[str] | None = None) -> Delivery:
        return await send_pieces(lambda piece: self.send_one(user, piece), text, sent=ids)

    async def send(self, conversation: ConversationRef, text: str) -> Delivery:
        return await self.send_text(conversation.chat_id, text)

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        user = conversation.chat_id
        return PieceSink(
            lambda text, ids: self.send_text(user, text, ids), channel="wecom", account=self.name
        )
