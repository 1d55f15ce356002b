"""The WeCom channel (`wecom`): self-built applications and intelligent bots, each account at
its own callback path. Conversations carry the account name; the account says which kind
answers (see wecom_app.py and wecom_bot.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from channels.base import (
    Capabilities,
    ChannelHost,
    ConversationRef,
    Delivery,
    ReplySink,
    StoredMessage,
)
from channels.wechat.config import WechatSettings
from channels.wechat.delivery import MAX_BYTES
from channels.wechat.runtime import WechatChannelBase, bind
from channels.wechat.tokens import InProcessTokenStore, TokenStore
from channels.wechat.wecom_app import WecomApp
from channels.wechat.wecom_bot import WecomBot

if TYPE_CHECKING:
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

CHANNEL = "wecom"


class WecomChannel(WechatChannelBase):
    name = CHANNEL
    capabilities = Capabilities(max_length=MAX_BYTES, length_unit="bytes")

    def __init__(self, settings: WechatSettings, store: TokenStore | None = None) -> None:
        super().__init__(settings.max_body_bytes)
        self.apps = {a.name: WecomApp(a, settings.wecom_api_base_url) for a in settings.wecom_apps}
        self.bots = {b.name: WecomBot(b) for b in settings.wecom_bots}
        self._store: TokenStore = store or InProcessTokenStore()

    def share(self, cluster: RedisParts) -> None:
        # Tokens fetched once for all processes, per-member limits held across them.
        from channels.wechat.redis_tokens import RedisTokenStore

        self._store = RedisTokenStore(cluster.state, cluster.keys)
        for a in self.apps.values():
            a.share(cluster)
        if self.bots:
            # WeCom's polls of a bot's stream may reach any process.
            from channels.wechat.wecom_streams import SharedStreams

            streams = SharedStreams(cluster, spawn=self.spawn)
            for b in self.bots.values():
                b.shared = streams

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        for a in self.apps.values():
            app.router.add_get(a.s.path, bind(a.verify, self))
            app.router.add_post(a.s.path, bind(a.receive, self))
        for b in self.bots.values():
            app.router.add_get(b.s.path, bind(b.verify, self))
            app.router.add_post(b.s.path, bind(b.receive, self))

    async def start(self) -> None:
        await super().start()
        for a in self.apps.values():
            a.start(self, self._store)
        log.info(
            "wecom_accounts",
            apps={a.name: a.s.path for a in self.apps.values()},
            bots={b.name: b.s.path for b in self.bots.values()},
        )

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        app = self.apps.get(conversation.account)
        if app is not None:
            return app.open_reply(conversation, inbound)
        bot = self.bots.get(conversation.account)
        if bot is not None:
            return bot.open_reply(self, conversation, inbound)
        raise LookupError(f"no WeCom account named {conversation.account!r} is configured")

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        app = self.apps.get(conversation.account)
        if app is not None:
            return await app.send(conversation, text)
        bot = self.bots.get(conversation.account)
        if bot is not None:
            return await bot.send(self, conversation, text)
        return Delivery(ok=False, detail=f"no WeCom account {conversation.account!r}")
