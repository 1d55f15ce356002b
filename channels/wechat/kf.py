"""WeChat Customer Service (微信客服, channel `wecom_kf`): one WeCom corp's service accounts.

GET  <path>   URL verification: decrypt `echostr` (WeCom crypto) and echo it.
POST <path>   the `kf_msg_or_event` callback: encrypted XML saying an account has news (a
              sync token and its OpenKfId). Acknowledged at once; the account's puller then
              fetches the messages with `kf/sync_msg` (kf_sync.py) and stores each once.

Answers go out with `kf/send_msg` in sentence-aligned pieces of at most 2,048 bytes, each
with a msgid made from the question's id and the piece, so a retried piece is not shown
twice. WeCom allows a few messages per customer message within 48 hours: an answer outside
that is undeliverable and handed to a person. A handoff moves the session to WeCom's
reception pool (or a configured servicer); what servicers write there is stored as agent
messages, and the bot stays silent while they have the session.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto

from channels.base import (
    Capabilities,
    ChannelHost,
    ConversationRef,
    Delivery,
    InboundMessage,
    ReplySink,
    StoredMessage,
)
from channels.http import ApiError
from channels.wechat.api import WechatApiError
from channels.wechat.delivery import MAX_BYTES, PieceSink, send_pieces
from channels.wechat.kf_api import STATE_POOL, STATE_SERVICER, KfApi
from channels.wechat.kf_config import KfAccountSettings, WecomKfSettings
from channels.wechat.kf_inbound import KfItem, parse_item
from channels.wechat.kf_sync import Puller, PullGuard
from channels.wechat.runtime import WechatChannelBase, open_wecom_callback, verify_echo
from channels.wechat.tokens import InProcessTokenStore, TokenStore
from channels.wechat.xmlsafe import safe_xml

if TYPE_CHECKING:
    from cluster.redis import RedisParts

log = structlog.get_logger(__name__)

CHANNEL = "wecom_kf"
WELCOME_CODE_TTL_S = 20.0  # send_msg_on_event accepts a welcome_code this long
SERVICER_REASON = "wecom_servicer"  # a servicer took the session on WeCom's side
ENDED_REASON = "wecom_session_ended"  # ... and ended it: back to the bot
_ANSWER_MSGID = re.compile(r"^r(\d{1,18})_\d+_")
_KNOWN_CUSTOMERS = 50_000  # customers whose profile this process fetched already
_BATCH = 100  # customer/batchget takes at most 100 ids


class WecomKfChannel(WechatChannelBase):
    name = CHANNEL
    capabilities = Capabilities(max_length=MAX_BYTES, length_unit="bytes")

    def __init__(
        self, settings: WecomKfSettings, store: TokenStore | None = None, page_size: int = 1000
    ) -> None:
        super().__init__(settings.max_body_bytes)
        self.s = settings
        cb = settings.callback()
        self.crypto = EnterpriseCrypto(
            cb.resolve_token(), cb.resolve_aes_key(True), settings.corp_id
        )
        self._secret = settings.resolve_secret()
        self._store: TokenStore = store or InProcessTokenStore()
        self.accounts = {a.name: a for a in settings.accounts}
        self._by_kfid = {a.open_kfid: a for a in settings.accounts}
        self._page_size = page_size
        self._api: KfApi | None = None
        self._guard: PullGuard | None = None  # one pull per account across processes
        self.pullers: dict[str, Puller] = {}
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        # (account, customer) -> (welcome_code, monotonic deadline) of an enter_session
        self._welcome: dict[tuple[str, str], tuple[str, float]] = {}

    @property
    def api(self) -> KfApi:
        if self._api is None:
            raise RuntimeError("the wecom_kf channel is not started")
        return self._api

    def share(self, cluster: RedisParts) -> None:
        # The token fetched once for all processes; one process at a time pulls an account.
        from channels.wechat.kf_sync import redis_pull_guard
        from channels.wechat.redis_tokens import RedisTokenStore

        self._store = RedisTokenStore(cluster.state, cluster.keys)
        keys = cluster.keys
        self._guard = redis_pull_guard(cluster.state, lambda name: keys("wecom_kf_pull", name))

    def register(self, app: web.Application, host: ChannelHost) -> None:
        self._host = host
        app.router.add_get(self.s.path, self.verify)
        app.router.add_post(self.s.path, self.receive)

    async def start(self) -> None:
        await super().start()
        self._api = KfApi(
            self.http,
            self.s.api_base_url,
            corp_id=self.s.corp_id,
            secret=self._secret,
            store=self._store,
        )
        for a in self.s.accounts:
            p = Puller(
                a.name,
                a.open_kfid,
                self._api,
                self.host.db,
                partial(self._store_page, a),
                self.spawn,
                self._page_size,
                self._guard,
            )
            self.pullers[a.name] = p
            p.kick()  # what arrived while we were down (the cursor is in the database)
            if self.s.safety_pull_seconds > 0:
                self.spawn(p.safety_loop(self.s.safety_pull_seconds))
        log.info("wecom_kf_accounts", path=self.s.path, accounts=sorted(self.accounts))

    # -- callbacks ---------------------------------------------------------------------------

    async def verify(self, request: web.Request) -> web.Response:
        return verify_echo(self.crypto, request.query)

    async def receive(self, request: web.Request) -> web.Response:
        inner = await open_wecom_callback(request, self.crypto, self.max_body_bytes)
        _, event = safe_xml(inner.encode("utf-8"))
        if str(event.get("Event") or "") != "kf_msg_or_event":
            log.info("wecom_kf_other_event", event=str(event.get("Event") or event.get("MsgType")))
            return web.Response(text="success")  # other WeCom events: nothing to pull
        kfid = event.get("OpenKfId")
        if not isinstance(kfid, str) or not kfid:
            raise ApiError(400, "invalid_message", "kf_msg_or_event without <OpenKfId>")
        account = self._by_kfid.get(kfid)
        if account is None:
            # Acknowledged all the same: WeCom would only retry a refusal.
            log.warning("wecom_kf_unknown_account", open_kfid=kfid)
            return web.Response(text="success")
        token = event.get("Token")
        self.pullers[account.name].kick(token if isinstance(token, str) else None)
        return web.Response(text="success")

    # -- pulled messages ---------------------------------------------------------------------

    async def _store_page(self, account: KfAccountSettings, items: list[dict[str, Any]]) -> None:
        """Store a page: each customer's items in order, different customers side by side."""
        by_customer: dict[str, list[KfItem]] = {}
        for raw in items:
            try:
                item = parse_item(self.name, account.name, raw)
            except ValueError as e:
                log.warning("wecom_kf_bad_item", account=account.name, error=str(e))
                continue
            if item.message is not None:
                by_customer.setdefault(item.message.user_id, []).append(item)
        profiles = await self._profiles(account.name, list(by_customer))
        # Every customer's items are stored before this returns (and the cursor moves on),
        # or the first failure is raised and the page is pulled again.
        await asyncio.gather(
            *(self._store_items(account, found, profiles) for found in by_customer.values())
        )

    async def _store_items(
        self, account: KfAccountSettings, items: list[KfItem], profiles: dict[str, Any]
    ) -> None:
        for item in items:
            m = item.message
            assert m is not None
            profile = profiles.pop(m.user_id, None)
            if profile is not None:
                m = _with_profile(m, profile)
            result = await self.host.ingest(m)
            if not result.duplicate:
                await self._act(account, item, result.conversation_id)

    async def _act(self, account: KfAccountSettings, item: KfItem, conversation_id: int) -> None:
        """What a newly stored item asks for: sends go off the pull; an owner change happens
        before the next item is stored (a customer's next message must find it)."""
        host = self.host
        if item.action == "media" and self.s.media_text:
            self.spawn(host.send_message(conversation_id, self.s.media_text, sender="system"))
        elif item.action == "voice" and self.s.voice_text:
            self.spawn(host.send_message(conversation_id, self.s.voice_text, sender="system"))
        elif item.action == "welcome" and account.welcome_text:
            assert item.message is not None
            sent_at = item.message.sent_at
            age = time.time() - sent_at.timestamp() if sent_at else 0.0
            if age < WELCOME_CODE_TTL_S:
                key = (account.name, item.message.user_id)
                deadline = time.monotonic() + WELCOME_CODE_TTL_S - max(age, 0.0)
                self._welcome[key] = (item.welcome_code, deadline)
                if len(self._welcome) > _KNOWN_CUSTOMERS:  # codes never used: drop the dead
                    now = time.monotonic()
                    self._welcome = {k: v for k, v in self._welcome.items() if v[1] > now}
                self.spawn(host.send_message(conversation_id, account.welcome_text))
        elif item.action == "servicer":
            # A WeCom servicer has the session: the bot must not talk over them.
            await host.platform_move(conversation_id, "claim", SERVICER_REASON)
        elif item.action == "send_failed":
            # Our msgids name the question the answer was for (open_reply: r<id>_<piece>_...).
            found = _ANSWER_MSGID.match(item.fail_msgid)
            if found is not None:
                await host.answer_not_delivered(int(found[1]), "WeCom: msg_send_fail")
        elif item.action == "ended":
            # The servicer ended the session: the bot answers the customer again.
            await host.platform_move(conversation_id, "handback", ENDED_REASON)
            log.info("wecom_kf_session_ended", conversation_id=conversation_id)

    async def _profiles(self, account: str, customers: list[str]) -> dict[str, dict[str, Any]]:
        """customer/batchget for the customers this process has not looked up yet."""
        new = [u for u in customers if (account, u) not in self._known]
        for u in new:
            self._known[(account, u)] = None
        while len(self._known) > _KNOWN_CUSTOMERS:
            self._known.popitem(last=False)
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(new), _BATCH):
            try:
                found.update(await self.api.customers(new[i : i + _BATCH]))
            except Exception as e:  # a profile is nice to have; the messages matter
                log.warning("wecom_kf_profiles_failed", error=repr(e))
        return found

    # -- sending -----------------------------------------------------------------------------

    def _account(self, conversation: ConversationRef) -> KfAccountSettings:
        a = self.accounts.get(conversation.account)
        if a is None:
            raise LookupError(f"no wecom_kf account named {conversation.account!r}")
        return a

    async def send_text(
        self,
        account: KfAccountSettings,
        user: str,
        text: str,
        ids: list[str] | None = None,
        key: str | None = None,
    ) -> Delivery:
        """`key` names the message (the question it answers): with it each piece carries a
        msgid WeCom delivers at most once."""
        count = len(ids or [])

        async def one(piece: str) -> str:
            nonlocal count
            count += 1
            msgid = None
            if key is not None:
                digest = hashlib.sha1(piece.encode("utf-8")).hexdigest()[:8]
                msgid = f"{key}_{count}_{digest}"
            return await self.api.send_text(account.open_kfid, user, piece, msgid)

        return await send_pieces(one, text, sent=ids)

    async def send(self, conversation: ConversationRef, text: str, *, sender: str) -> Delivery:
        account = self._account(conversation)
        welcome = self._welcome.pop((account.name, conversation.chat_id), None)
        if welcome is not None and sender == "system" and text == account.welcome_text:
            code, deadline = welcome
            if time.monotonic() < deadline:
                try:
                    return Delivery([await self.api.send_on_event(code, text)])
                except WechatApiError as e:
                    log.warning("wecom_kf_welcome_failed", errcode=e.errcode, errmsg=e.errmsg)
                    return Delivery(ok=False, detail=str(e))
        return await self.send_text(account, conversation.chat_id, text)

    def open_reply(self, conversation: ConversationRef, inbound: StoredMessage) -> ReplySink:
        account = self._account(conversation)
        user, key = conversation.chat_id, f"r{inbound.id}"
        return PieceSink(
            lambda text, ids: self.send_text(account, user, text, ids, key),
            channel=CHANNEL,
            account=account.name,
        )

    async def handed_off(self, conversation: ConversationRef, reason: str) -> None:
        account = self._account(conversation)
        if account.reception == "console" or reason == SERVICER_REASON:
            return  # people answer in the console / WeCom has moved the session already
        user = conversation.chat_id
        state, servicer = await self.api.service_state(account.open_kfid, user)
        if state in (STATE_POOL, STATE_SERVICER):
            log.info("wecom_kf_with_people_already", state=state, servicer=servicer)
            return
        if account.handoff_to == "servicer" and account.servicer_userid:
            await self.api.transfer(
                account.open_kfid, user, STATE_SERVICER, account.servicer_userid
            )
        else:
            await self.api.transfer(account.open_kfid, user, STATE_POOL)
        log.info("wecom_kf_session_transferred", conversation_id=conversation.id, reason=reason)


def _with_profile(m: InboundMessage, profile: dict[str, Any]) -> InboundMessage:
    """The customer's nickname (and union id where the corp may see it) on the contact."""
    attrs = {k: str(profile[k]) for k in ("nickname", "avatar", "unionid") if profile.get(k)}
    return replace(m, user_name=attrs.get("nickname"), contact_attributes=attrs or None)
