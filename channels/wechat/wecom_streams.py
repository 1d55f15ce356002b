"""WeCom bot streams across processes (queue.backend: redis): WeCom's first callback, its
retries and its polls may each reach another process than the one writing the answer.

One hash per stream, `<prefix>:wxstream:<account>:<stream id>`: its deadline (`exp`, Redis
server time), the text so far, the final answer, `closed` (the deadline passed first: the
answer goes by response_url), the message's response_url, and the callback waiting for the
answer. The writer flushes its text a few times a second (WeCom polls about once a second),
not at every delta. Deciding "shown in the stream" against "closed at the deadline" is one
Lua script on each side, so the shopper gets the answer exactly once, either way.

The chat's latest response_url (for a person's messages, which any process may send) is
shared too, and each URL is marked used once for all processes (WeCom takes it once).

While Redis is unreachable, callbacks and polls answer from the database (the stored
answer, else "not finished yet") and a writer that cannot finish the stream sends the
answer through the chat's response_url if this process holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from typing import TYPE_CHECKING, Any, Literal

import structlog
from redis.asyncio import Redis

from channels.base import Delivery, ReplySink, may_send
from channels.wechat.wecom_bot import RESPONSE_URL_TTL_S
from cluster.redis import LUA_NOW_MS, REDIS_DOWN, RedisParts
from cluster.wakeup import Spawn, Wakeups

if TYPE_CHECKING:
    from channels.wechat.runtime import WechatChannelBase
    from channels.wechat.wecom_bot import WecomBot

log = structlog.get_logger(__name__)

FLUSH_S = 0.25  # the writer's text reaches Redis at most this late
RETAIN_AFTER_S = 120  # a stream's hash outlives its deadline by this much
READY_WAIT_S = 0.2  # how long a callback waits for this process's mailbox to subscribe


# KEYS: hash. ARGV: ttl ms, retain s, response_url, waiter token, process. 1: already done.
_OPEN = (
    LUA_NOW_MS
    + """
redis.call('HSETNX', KEYS[1], 'exp', now + tonumber(ARGV[1]))
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'url', ARGV[3]) end
local h = redis.call('HMGET', KEYS[1], 'final', 'closed')
local done = h[1] or h[2]
if not done and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'wtok', ARGV[4], 'wproc', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if done then return 1 end
return 0
"""
)

# KEYS: hash. ARGV: text so far, ttl ms, retain s.
_WRITE = (
    LUA_NOW_MS
    + """
redis.call('HSETNX', KEYS[1], 'exp', now + tonumber(ARGV[2]))
local h = redis.call('HMGET', KEYS[1], 'final', 'closed')
if not h[1] and not h[2] then redis.call('HSET', KEYS[1], 'content', ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: hash. ARGV: final text, text so far, ttl ms, retain s, mailbox prefix.
# {1 shown in the stream | 0 closed first, response_url}
_FINISH = (
    LUA_NOW_MS
    + """
redis.call('HSETNX', KEYS[1], 'exp', now + tonumber(ARGV[3]))
local h = redis.call('HMGET', KEYS[1], 'exp', 'closed', 'url', 'wtok', 'wproc')
local shown = 0
if not h[2] and now < tonumber(h[1]) then
  redis.call('HSET', KEYS[1], 'final', ARGV[1], 'content', ARGV[2])
  shown = 1
  if h[4] then redis.call('PUBLISH', ARGV[5] .. ':' .. h[5], h[4]) end
else
  redis.call('HSET', KEYS[1], 'closed', '1')
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {shown, h[3] or ''}
"""
)

# KEYS: hash. ARGV: text so far, ttl ms, retain s, mailbox prefix. The stream ends on it.
_FAIL = (
    LUA_NOW_MS
    + """
redis.call('HSETNX', KEYS[1], 'exp', now + tonumber(ARGV[2]))
local h = redis.call('HMGET', KEYS[1], 'final', 'wtok', 'wproc')
if not h[1] then
  redis.call('HSET', KEYS[1], 'final', ARGV[1], 'content', ARGV[1])
  if h[2] then redis.call('PUBLISH', ARGV[4] .. ':' .. h[3], h[2]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: hash. nil if unknown, else {content, has final, final, closed, closed now}.
_VIEW = (
    LUA_NOW_MS
    + """
local h = redis.call('HMGET', KEYS[1], 'exp', 'content', 'final', 'closed')
if not h[1] then return false end
local closed = h[4]
local closing = 0
if not h[3] and not closed and now >= tonumber(h[1]) then
  redis.call('HSET', KEYS[1], 'closed', '1')
  closed = '1'
  closing = 1
end
return {h[2] or '', h[3] and 1 or 0, h[3] or '', closed and 1 or 0, closing}
"""
)


class SharedStreams:
    def __init__(self, cluster: RedisParts, spawn: Spawn | None = None) -> None:
        self.redis: Redis = cluster.bus
        self._keys = cluster.keys
        self.process = cluster.process
        self._mail = Wakeups(self.redis, cluster.keys("wake", "wecom"), self.process, spawn)
        self.mailbox = self._mail.prefix
        self._scripts = {
            src: self.redis.register_script(src) for src in (_OPEN, _WRITE, _FINISH, _FAIL, _VIEW)
        }

    async def run(self, script: str, bot: WecomBot, sid: str, *args: str | int) -> Any:
        key = self._keys("wxstream", bot.name, sid)
        return await self._scripts[script](keys=[key], args=list(args))

    def ttl_ms(self, bot: WecomBot) -> int:
        return int(bot.s.stream_ttl_seconds * 1000)

    def retain_s(self, bot: WecomBot) -> int:
        return int(bot.s.stream_ttl_seconds) + RETAIN_AFTER_S

    async def callback(self, bot: WecomBot, sid: str, url: str, budget: float) -> dict[str, Any]:
        """The reply to a message's callback (the first or a retry): the finished answer if
        it is ready within `budget` s, else the stream so far."""
        token = uuid.uuid4().hex if budget > 0 else ""
        woken = self._mail.expect(token) if token else None
        if token:
            await self._mail.ready(min(budget, READY_WAIT_S))
        try:
            done = await self.run(
                _OPEN, bot, sid, self.ttl_ms(bot), self.retain_s(bot), url, token, self.process
            )
            if woken is not None and not done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), budget)
            shown = await self.view(bot, sid)
        except REDIS_DOWN as e:
            log.warning("wecom_stream_unavailable", account=bot.name, error=repr(e))
            shown = None
        finally:
            if token:
                self._mail.forget(token)
        # Not known (Redis lost it meanwhile): WeCom polls, and a poll finds the answer.
        return shown or bot.stream_view(sid, "", None, False)

    async def view(self, bot: WecomBot, sid: str) -> dict[str, Any] | None:
        """What a poll shows, None if Redis does not know the stream (the caller looks in
        the database)."""
        try:
            got = await self.run(_VIEW, bot, sid)
        except REDIS_DOWN as e:
            log.warning("wecom_stream_unavailable", account=bot.name, error=repr(e))
            return None
        if got is None:
            return None
        content, has_final, final, closed, closing = got
        if closing:
            log.info("wecom_stream_closed_early", account=bot.name, stream=sid)
        return bot.stream_view(
            sid, _text(content), _text(final) if has_final else None, bool(closed)
        )

    # -- response_url: the latest per chat, each used once by whichever process -------------

    def _latest_url(self, bot: WecomBot, chat_id: str) -> str:
        return self._keys("wxurl", bot.name, chat_id)

    async def remember_url(self, bot: WecomBot, chat_id: str, url: str) -> None:
        try:
            await self.redis.set(self._latest_url(bot, chat_id), url, ex=RESPONSE_URL_TTL_S)
        except REDIS_DOWN as e:
            log.warning("wecom_response_url_not_shared", account=bot.name, error=repr(e))

    async def take_url(
        self, bot: WecomBot, chat_id: str, preferred: str | None
    ) -> str | Literal[False] | None:
        """An unused response_url for the chat (the message's own first), marked used for
        every process; False if Redis cannot be asked (the caller uses what it holds)."""
        try:
            if preferred and await self._use(preferred):
                return preferred
            url = await self.redis.getdel(self._latest_url(bot, chat_id))
            if url is None:
                return None
            text = _text(url)
            return text if await self._use(text) else None
        except REDIS_DOWN as e:
            log.warning("wecom_response_url_unavailable", account=bot.name, error=repr(e))
            return False

    async def _use(self, url: str) -> bool:
        """Mark `url` used; False if some process used it before."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:32]  # (the key names no secret)
        used = self._keys("wxurl-used", digest)
        return bool(await self.redis.set(used, "1", nx=True, ex=RESPONSE_URL_TTL_S + 300))

    def sink(self, bot: WecomBot, ch: WechatChannelBase, sid: str, chat_id: str) -> ReplySink:
        return _SharedBotSink(self, bot, ch, sid, chat_id)


class _SharedBotSink(ReplySink):
    """Writes one answer into its shared stream; the same rules as wecom_bot._BotSink."""

    def __init__(
        self,
        streams: SharedStreams,
        bot: WecomBot,
        ch: WechatChannelBase,
        sid: str,
        chat_id: str,
    ) -> None:
        self._streams = streams
        self._bot = bot
        self._ch = ch
        self._sid = sid
        self._chat = chat_id
        self._content = ""
        self._flusher: asyncio.Task[None] | None = None

    async def push(self, delta: str) -> None:
        if not may_send():
            return  # a person took over: the stream stays on what was shown
        self._content += delta
        if self._flusher is None:
            self._flusher = self._ch.spawn(self._flush())

    async def _flush(self) -> None:
        """Batched: one write carries every delta of the last FLUSH_S."""
        s = self._streams
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                content = self._content
                try:
                    await s.run(
                        _WRITE,
                        self._bot,
                        self._sid,
                        content,
                        s.ttl_ms(self._bot),
                        s.retain_s(self._bot),
                    )
                except REDIS_DOWN as e:
                    log.warning("wecom_stream_write_failed", stream=self._sid, error=repr(e))
                if self._content == content:
                    return
        finally:
            self._flusher = None

    async def _stop_flushing(self) -> None:
        task, self._flusher = self._flusher, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def finish(self, final_text: str) -> Delivery:
        if not may_send():
            return Delivery(ok=False, detail="a person took the conversation over")
        await self._stop_flushing()
        s = self._streams
        try:
            shown, url = await s.run(
                _FINISH,
                self._bot,
                self._sid,
                final_text,
                self._content,
                s.ttl_ms(self._bot),
                s.retain_s(self._bot),
                s.mailbox,
            )
        except REDIS_DOWN as e:
            # The stream cannot show it: like a stream closed early, it goes by response_url.
            log.warning("wecom_stream_finish_failed", stream=self._sid, error=repr(e))
            shown, url = 0, b""
        return await self._bot.after_stream(
            self._ch, self._sid, self._chat, _text(url) or None, final_text, bool(shown)
        )

    async def fail(self, reason: str) -> None:
        await self._stop_flushing()
        s = self._streams
        try:
            await s.run(
                _FAIL,
                self._bot,
                self._sid,
                self._content,
                s.ttl_ms(self._bot),
                s.retain_s(self._bot),
                s.mailbox,
            )
        except REDIS_DOWN as e:
            log.warning("wecom_stream_fail_failed", stream=self._sid, error=repr(e))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
