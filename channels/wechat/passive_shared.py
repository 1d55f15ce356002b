"""The 5-second window across processes (queue.backend: redis): the `AnswerBoard` kept in
Redis, so a webhook request held by one process can carry an answer written by another.

Per inbound message one hash `<prefix>:wxwin:<id>` holds the phase (as in passive.py, plus
`handed`: given to a waiting request that has not taken it yet), the waiting request (token,
process, deadline in Redis server time) and the handed text. Every change of phase is one Lua
script, so exactly one of "a waiting request writes it" and "the API sends it" happens:

- a request registers as the waiter (a retry replaces the request WeChat gave up on);
- the sink's claim hands the text to a live waiter (`handed`) or turns the phase to `api`;
- the waiter takes a handed text (`passive`) when woken (pub/sub to its process's mailbox)
  or when its window ends — a lost wake-up only makes it later;
- the waiter pushes "written 1/0" on `<key>:rep`; the sink pops it (BLPOP). If nothing comes
  in time the sink gives up atomically: `handed` becomes `api` (the request can no longer
  take it); `passive` means the request took it and is writing it: it counts as delivered
  (WeChat's retry of a lost reply carries it again).

While Redis is unreachable a request answers `success` at once and the answer goes by the
API: the passive reply is a shortcut, the API always works.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import structlog
from redis.asyncio import Redis

from channels.wechat.passive import RETAIN_S
from cluster.redis import LUA_NOW_MS, REDIS_DOWN, RedisParts
from cluster.wakeup import Spawn, Wakeups

log = structlog.get_logger(__name__)

READY_WAIT_S = 0.2  # how long a request waits for this process's mailbox to subscribe
_RETAIN = str(int(RETAIN_S))

# Redis server time in ms: one clock for every process's deadlines.

# KEYS: hash. ARGV: token, process, budget ms, retain s, mailbox prefix.
_REGISTER = (
    LUA_NOW_MS
    + """
local phase = redis.call('HGET', KEYS[1], 'phase') or 'writing'
local result
if phase == 'passive' then
  result = {'again', redis.call('HGET', KEYS[1], 'text')}
elseif phase == 'handed' then
  -- WeChat gave up on the request it was handed to: this retry carries it instead.
  redis.call('HSET', KEYS[1], 'phase', 'passive', 'hand', ARGV[1])
  result = {'take', redis.call('HGET', KEYS[1], 'text')}
elseif phase == 'writing' then
  local old = redis.call('HMGET', KEYS[1], 'waiter', 'wproc')
  if old[1] and old[1] ~= ARGV[1] then  -- (not us: the client may retry this script)
    redis.call('PUBLISH', ARGV[5] .. ':' .. old[2], old[1])
  end
  redis.call('HSET', KEYS[1], 'phase', 'writing', 'waiter', ARGV[1], 'wproc', ARGV[2],
             'until', now + tonumber(ARGV[3]))
  result = {'wait'}
else
  return {'no'}
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return result
"""
)

# KEYS: hash. ARGV: token. The handed text if it is this waiter's, else nil (window closed).
# Taking twice gives it again: the client retries a script whose reply was lost.
_TAKE = """
local h = redis.call('HMGET', KEYS[1], 'phase', 'hand', 'waiter', 'text')
if (h[1] == 'handed' or h[1] == 'passive') and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'phase', 'passive')
  return h[4]
end
if h[3] == ARGV[1] then redis.call('HDEL', KEYS[1], 'waiter', 'wproc', 'until') end
return false
"""

# KEYS: hash, report list. ARGV: token, retain s. A request that stops waiting (cancelled):
# leave the window; a text handed to it meanwhile goes back to the sink ("not written").
_LEAVE = """
local h = redis.call('HMGET', KEYS[1], 'phase', 'hand', 'waiter')
if h[1] == 'handed' and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'phase', 'api')
  redis.call('HDEL', KEYS[1], 'hand', 'text')
  redis.call('LPUSH', KEYS[2], '0')
  redis.call('EXPIRE', KEYS[2], ARGV[2])
elseif h[3] == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'waiter', 'wproc', 'until')
end
return 1
"""

# KEYS: hash. ARGV: text, retain s, mailbox prefix.
_CLAIM = (
    LUA_NOW_MS
    + """
local h = redis.call('HMGET', KEYS[1], 'phase', 'waiter', 'wproc', 'until')
local phase = h[1] or 'writing'
if phase == 'writing' and h[2] and tonumber(h[4]) > now then
  redis.call('HSET', KEYS[1], 'phase', 'handed', 'hand', h[2], 'text', ARGV[1])
  redis.call('HDEL', KEYS[1], 'waiter', 'wproc', 'until')
  redis.call('PUBLISH', ARGV[3] .. ':' .. h[3], h[2])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'handed', h[3], h[2]}
end
-- Claimed before (the client's retry after a lost reply, or a recovered answer): the
-- report of that hand-over decides.
if phase == 'handed' or phase == 'passive' then return {'handed'} end
if phase == 'writing' then
  redis.call('HSET', KEYS[1], 'phase', 'api')
  redis.call('HDEL', KEYS[1], 'waiter', 'wproc', 'until')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {'api'}
"""
)

# KEYS: hash. The sink heard nothing: 'passive' if the request took the text, else 'api'.
_GIVE_UP = """
local phase = redis.call('HGET', KEYS[1], 'phase')
if phase == 'passive' then return 'passive' end
if phase == 'handed' then
  redis.call('HSET', KEYS[1], 'phase', 'api')
  redis.call('HDEL', KEYS[1], 'hand', 'text')
end
return 'api'
"""

# KEYS: hash. ARGV: phase (api | done), retain s, mailbox prefix. Releases a waiting request.
_CLOSE = """
local h = redis.call('HMGET', KEYS[1], 'waiter', 'wproc')
if h[1] then redis.call('PUBLISH', ARGV[3] .. ':' .. h[2], h[1]) end
redis.call('HSET', KEYS[1], 'phase', ARGV[1])
redis.call('HDEL', KEYS[1], 'waiter', 'wproc', 'until', 'hand', 'text')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: hash. Milliseconds left of the open window, -1 if none is open.
_WINDOW_LEFT = (
    LUA_NOW_MS
    + """
local h = redis.call('HMGET', KEYS[1], 'phase', 'waiter', 'until')
if (h[1] and h[1] ~= 'writing') or not h[2] then return -1 end
local left = tonumber(h[3]) - now
if left < 0 then return -1 end
return left
"""
)


class _Ticket:
    """The request's side of a hand-over: report whether the passive reply went out."""

    def __init__(self, board: SharedAnswerBoard, inbound_id: int) -> None:
        self._board = board
        self._id = inbound_id

    async def begin(self) -> bool:
        return True  # taking the text was the atomic step; nobody can withdraw it now

    async def report(self, written: bool) -> None:
        key = self._board.report_key(self._id)
        try:
            async with self._board.redis.pipeline(transaction=True) as p:
                p.lpush(key, "1" if written else "0")
                p.expire(key, int(RETAIN_S))
                await p.execute()
        except REDIS_DOWN as e:
            # The sink then decides by itself: the request took it, so it counts as passive.
            log.warning("wechat_passive_report_lost", inbound_id=self._id, error=repr(e))


class _Handover:
    """The sink's side: did the request that got the text write it?"""

    def __init__(self, board: SharedAnswerBoard, inbound_id: int) -> None:
        self._board = board
        self._id = inbound_id

    async def delivered(self, timeout: float) -> bool:
        b = self._board
        try:
            got = await b.redis.blpop([b.report_key(self._id)], timeout=timeout)
            if got is not None:
                return bool(got[1] == b"1")
            return bool(await b.run(_GIVE_UP, self._id) == b"passive")
        except REDIS_DOWN as e:
            # Unknown: send by the API rather than risk the shopper getting nothing.
            log.warning("wechat_passive_outcome_unknown", inbound_id=self._id, error=repr(e))
            return False


class SharedAnswerBoard:
    def __init__(self, cluster: RedisParts, spawn: Spawn | None = None) -> None:
        self.redis: Redis = cluster.bus
        self._keys = cluster.keys
        self.process = cluster.process
        self._mail = Wakeups(self.redis, cluster.keys("wake", "wechat"), self.process, spawn)
        self._scripts = {
            src: self.redis.register_script(src)
            for src in (_REGISTER, _TAKE, _LEAVE, _CLAIM, _GIVE_UP, _CLOSE, _WINDOW_LEFT)
        }

    def key(self, inbound_id: int) -> str:
        return self._keys("wxwin", inbound_id)

    def report_key(self, inbound_id: int) -> str:
        return self._keys("wxwin", inbound_id, "rep")

    async def run(self, script: str, inbound_id: int, *args: str | int) -> Any:
        keys = [self.key(inbound_id)]
        if script is _LEAVE:
            keys.append(self.report_key(inbound_id))
        return await self._scripts[script](keys=keys, args=list(args))

    def expect(self, inbound_id: int) -> None:
        return None  # the hash is made by whichever side comes first

    # -- the webhook side -----------------------------------------------------------------

    async def wait(self, inbound_id: int, budget: float) -> tuple[str | None, _Ticket | None]:
        if budget <= 0:
            return None, None
        token = uuid.uuid4().hex
        await self._mail.ready(min(budget, READY_WAIT_S))
        woken = self._mail.expect(token)
        try:
            # Bounded: a Redis that does not answer must not hold WeChat past its 5 s. (If
            # the script ran after all, a text handed to us goes back to the API: see GIVE_UP.)
            async with asyncio.timeout(budget):
                res = await self.run(
                    _REGISTER,
                    inbound_id,
                    token,
                    self.process,
                    int(budget * 1000),
                    _RETAIN,
                    self._mail.prefix,
                )
            kind = res[0]
            if kind == b"again":
                return _text(res[1]), None
            if kind == b"take":
                return _text(res[1]), _Ticket(self, inbound_id)
            if kind != b"wait":
                return None, None
            try:
                await asyncio.wait_for(woken.wait(), budget)
            except TimeoutError:
                pass  # the window ends: take what was handed meanwhile, or leave
            except asyncio.CancelledError:
                with contextlib.suppress(*REDIS_DOWN):
                    await self.run(_LEAVE, inbound_id, token, _RETAIN)
                raise
            text = await self.run(_TAKE, inbound_id, token)
            if text is None:
                return None, None
            return _text(text), _Ticket(self, inbound_id)
        except (*REDIS_DOWN, TimeoutError) as e:
            log.warning("wechat_passive_window_unavailable", inbound_id=inbound_id, error=repr(e))
            return None, None
        finally:
            self._mail.forget(token)

    # -- the sink side --------------------------------------------------------------------

    async def claim(self, inbound_id: int, text: str) -> _Handover | None:
        try:
            res = await self.run(_CLAIM, inbound_id, text, _RETAIN, self._mail.prefix)
        except REDIS_DOWN as e:
            log.warning("wechat_passive_claim_failed", inbound_id=inbound_id, error=repr(e))
            return None
        if res[0] != b"handed":
            return None
        if len(res) == 3 and _text(res[1]) == self.process:
            self._mail.wake(_text(res[2]))  # our own request: no need to wait for pub/sub
        return _Handover(self, inbound_id)

    async def to_api(self, inbound_id: int) -> None:
        await self._close(inbound_id, "api")

    async def abandon(self, inbound_id: int) -> None:
        await self._close(inbound_id, "done")

    async def _close(self, inbound_id: int, phase: str) -> None:
        try:
            await self.run(_CLOSE, inbound_id, phase, _RETAIN, self._mail.prefix)
        except REDIS_DOWN as e:
            # A waiting request then finds nothing handed to it and answers `success`.
            log.warning("wechat_passive_close_failed", inbound_id=inbound_id, error=repr(e))

    async def window_left(self, inbound_id: int) -> float | None:
        try:
            left = int(await self.run(_WINDOW_LEFT, inbound_id))
        except REDIS_DOWN:
            return None
        return None if left < 0 else left / 1000


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
