"""The live event bus across processes (queue.backend: redis): `RedisHub`, the in-process
`Hub` with Redis pub/sub behind it, so a shopper's socket or SSE stream and the agent console
get every event whichever process made it.

Channels (names under the key prefix):
- `bus:c:<conversation id>`: everything published or signalled for one conversation. A
  process SUBSCRIBEs to it only while it holds a client of that conversation, so at 100
  messages a second it receives the deltas of the answers its own clients follow, not all.
- `bus:console`: stored messages (durable events) and notes, for the agent console; a process
  listens while it has a console open.
- `bus:owners`: owner changes; every process listens (they are rare): they update the set of
  conversations a person took (`Parts.taken`, see `mirror_taken`) and reach the console.

Local subscribers get local events directly, as from `Hub`; a message carries the name of the
process that sent it, and a process skips its own. Publishing never waits for Redis: events
queue up and a background sender sends what a loop tick gathered in one pipeline, in order
(one sender, one connection: the order per conversation holds).

The text of the answer streaming is kept in a Redis list per conversation (`bus:inflight:<id>`:
its seq, then the deltas), written in the same pipeline before the events, so a client that
subscribes on another process and then reads the list misses nothing (`answer_so_far`).

When Redis is down or restarts: local delivery goes on; the sender keeps up to `max_pending`
events and sends them once Redis is back (older ones are dropped and logged); redis-py
reconnects and subscribes again, and then every stream that relied on other processes' events
is closed — its client reconnects and resumes from the database by its last event id, as
after any dropped stream. The in-flight texts are rewritten, and an owner change made during
the outage is caught at the latest by the database check when the answer is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from redis.asyncio.client import Pipeline

from bot.hub import Hub, HubSubscription
from channels.base import ConversationEvent
from cluster.redis import REDIS_DOWN, RedisParts
from storage.handoff import MOVES
from storage.models import Owner

log = structlog.get_logger(__name__)

# Deletes the in-flight text only if it is still the answer's with that seq (another process
# may already stream the conversation's next answer).
_DROP_IF_SEQ = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

OwnerListener = Callable[[ConversationEvent], None]


class _Written:
    """What this process last wrote of a conversation's in-flight text: its seq, the hub's
    list of deltas it came from (a new answer is a new list) and how many of them; `count`
    -1 when a failed send left it unknown (the next one rewrites it whole)."""

    __slots__ = ("count", "deltas", "seq")

    def __init__(self, seq: int, deltas: list[str], count: int) -> None:
        self.seq, self.deltas, self.count = seq, deltas, count


class RedisHub(Hub):
    """`Hub` across processes. `start()` before use, `aclose()` at shutdown."""

    def __init__(
        self,
        cluster: RedisParts,
        queue_size: int = 1000,
        *,
        inflight_ttl_s: float = 300.0,
        ready_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        max_pending: int = 50_000,
    ) -> None:
        super().__init__(queue_size)
        self._redis = cluster.bus
        self._keys = cluster.keys
        self._origin = cluster.process.encode()
        self._owners = self._keys("bus", "owners").encode()
        self._console = self._keys("bus", "console").encode()
        self._inflight_ttl_ms = int(inflight_ttl_s * 1000)
        self._ready_timeout_s = ready_timeout_s
        self._retry_s = retry_s
        self._max_pending = max_pending
        self._pubsub = self._redis.pubsub()
        # Subscriptions: the channels wanted now; one event per channel, set while Redis
        # confirmed the subscription on the current connection.
        self._wanted: set[bytes] = {self._owners}
        self._subscribed: dict[bytes, asyncio.Event] = {}
        self._owner_confirmations = 0
        self._remote_all = 0  # console subscribers that follow every process
        self._owner_listeners: list[OwnerListener] = []
        # What the sender sends next: (channel, message) in publish order, and the
        # conversations whose in-flight text changed (with the seq of an answer that ended).
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._dirty: dict[int, int | None] = {}
        self._written: dict[int, _Written] = {}
        self._dropped = 0
        self._wake_sender = asyncio.Event()
        self._wake_control = asyncio.Event()
        self._linked = asyncio.Event()  # the pub/sub connection exists (first SUBSCRIBE sent)
        self._tasks: list[asyncio.Task[None]] = []
        # Set by aclose: a loop that caught what a cancelled Redis call turned into a
        # connection error must still end.
        self._closing = False

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening and sending (never waits for Redis: it may be down yet)."""
        self._tasks = [
            asyncio.create_task(self._control(), name="bus-control"),
            asyncio.create_task(self._read(), name="bus-reader"),
            asyncio.create_task(self._send(), name="bus-sender"),
        ]
        self._wake_control.set()

    async def aclose(self, flush_s: float = 2.0) -> None:
        """Send what is still queued (for up to `flush_s`), then stop."""
        deadline = time.monotonic() + flush_s
        while (self._outbox or self._dirty) and time.monotonic() < deadline and self._tasks:
            self._wake_sender.set()
            await asyncio.sleep(0.01)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=flush_s)
            if stuck:
                log.warning("bus_tasks_did_not_stop", tasks=[t.get_name() for t in stuck])
        self._tasks = []
        with contextlib.suppress(*REDIS_DOWN):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # (redis-py untyped)

    def on_owner_change(self, listener: OwnerListener) -> None:
        """Call `listener(event)` for every owner event another process announces."""
        self._owner_listeners.append(listener)

    # -- the Hub interface ----------------------------------------------------------------

    def subscribe(self, conversation_id: int) -> HubSubscription:
        sub = super().subscribe(conversation_id)
        self._want(self._channel(conversation_id))
        return sub

    def subscribe_all(self, local_only: bool = False) -> HubSubscription:
        sub = super().subscribe_all(local_only)
        if not local_only:
            self._remote_all += 1
            self._want(self._console)
        return sub

    def _remove(self, sub: HubSubscription) -> None:
        super()._remove(sub)
        cid = sub.conversation_id
        if cid is not None:
            if cid not in self._subs:
                self._unwant(self._channel(cid))
        elif not sub.local_only:
            self._remote_all -= 1
            if self._remote_all == 0:
                self._unwant(self._console)

    async def _ready(self, sub: HubSubscription) -> None:
        if sub.conversation_id is not None:
            channels = [self._channel(sub.conversation_id)]
        elif sub.local_only:
            return
        else:
            channels = [self._owners, self._console]
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                for ch in channels:
                    await self._flag(ch).wait()
        except TimeoutError:
            # Redis is away: the stream starts with this process's events; once Redis is
            # back it is closed and its client resumes from the database.
            log.warning("bus_subscribe_slow", channels=[c.decode() for c in channels])

    def publish(self, event: ConversationEvent) -> None:
        super().publish(event)
        cid, kind = event.conversation_id, event.type
        if kind in ("delta", "typing"):
            self._dirty.setdefault(cid, None)
        elif kind in ("final", "error"):
            self._dirty[cid] = event.seq
        message = self._encode(event)
        self._queue(self._channel(cid), message)
        if event.durable:
            self._queue(self._console, message)

    def forget_inflight(self, conversation_id: int) -> None:
        super().forget_inflight(conversation_id)
        self._dirty.setdefault(conversation_id, None)
        self._wake_sender.set()

    def signal(self, event: ConversationEvent) -> None:
        super().signal(event)
        self._queue(self._channel(event.conversation_id), self._encode(event))

    def announce(self, event: ConversationEvent) -> None:
        super().announce(event)
        channel = self._owners if event.type == "owner" else self._console
        self._queue(channel, self._encode(event))

    async def answer_so_far(self, conversation_id: int) -> tuple[int, list[str]] | None:
        local = self.inflight(conversation_id)
        if local is not None:
            return local
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                raw = await self._redis.lrange(self._inflight_key(conversation_id), 0, -1)
        except (TimeoutError, *REDIS_DOWN):
            return None  # the client gets the answer when it is stored
        if not raw:
            return None
        try:
            seq = int(raw[0])
        except ValueError:
            return None
        return seq, [t.decode() if isinstance(t, bytes) else t for t in raw[1:]]

    # -- names and messages ---------------------------------------------------------------

    def _channel(self, conversation_id: int) -> bytes:
        return self._keys("bus", "c", conversation_id).encode()

    def _inflight_key(self, conversation_id: int) -> str:
        return self._keys("bus", "inflight", conversation_id)

    def _encode(self, event: ConversationEvent) -> bytes:
        # Monotonic clocks differ between machines: the event's age travels as wall time.
        wall = time.time() - (time.monotonic() - event.at)
        body = orjson.dumps(
            {
                "c": event.conversation_id,
                "t": event.type,
                "s": event.seq,
                "i": event.index,
                "d": event.data,
                "w": wall,
            },
            default=str,
        )
        return self._origin + b"\n" + body

    def _decode(self, message: bytes) -> ConversationEvent | None:
        origin, _, body = message.partition(b"\n")
        if origin == self._origin:
            return None  # our own: local subscribers had it already
        try:
            m: dict[str, Any] = orjson.loads(body)
            age = max(0.0, time.time() - float(m["w"]))
            return ConversationEvent(
                int(m["c"]), m["t"], int(m["s"]), m["i"], m["d"], time.monotonic() - age
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("bus_message_unreadable", origin=origin.decode(errors="replace"))
            return None

    # -- receiving --------------------------------------------------------------------------

    def _flag(self, channel: bytes) -> asyncio.Event:
        """Set while Redis confirmed our subscription to `channel` on the live connection."""
        flag = self._subscribed.get(channel)
        if flag is None:
            flag = self._subscribed[channel] = asyncio.Event()
        return flag

    def _want(self, channel: bytes) -> None:
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._wake_control.set()

    def _unwant(self, channel: bytes) -> None:
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._wake_control.set()

    async def _control(self) -> None:
        """Brings Redis's subscriptions in line with the channels wanted (a client that
        comes and goes within a tick costs nothing)."""
        while not self._closing:
            await self._wake_control.wait()
            self._wake_control.clear()
            ps = self._pubsub
            current = set(ps.channels) - set(ps.pending_unsubscribe_channels)
            gone, new = current - self._wanted, self._wanted - current
            for ch in self._subscribed.keys() - self._wanted - current:
                del self._subscribed[ch]  # wanted for a moment, never subscribed
            try:
                if gone:
                    for ch in gone:
                        self._subscribed.pop(ch, None)
                    await ps.unsubscribe(*gone)
                if new:
                    await ps.subscribe(*new)
                    self._linked.set()
            except REDIS_DOWN:
                self._lost()
                await asyncio.sleep(self._retry_s)
                self._wake_control.set()
            except Exception:
                log.exception("bus_subscribe_failed")
                await asyncio.sleep(self._retry_s)
                self._wake_control.set()

    async def _read(self) -> None:
        while not self._closing:
            await self._linked.wait()
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except REDIS_DOWN:
                self._lost()
                await asyncio.sleep(self._retry_s)
                continue
            except Exception:
                log.exception("bus_read_failed")
                await asyncio.sleep(self._retry_s)
                continue
            if msg is not None:
                self._on_message(msg)

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind, channel = msg["type"], msg["channel"]
        if kind == "message":
            event = self._decode(msg["data"])
            if event is not None:
                self._deliver(channel, event)
        elif kind == "subscribe":
            if channel == self._owners:
                self._owner_confirmations += 1
                if self._owner_confirmations > 1:
                    self._reconnected()
            self._flag(channel).set()
        elif kind == "unsubscribe":
            flag = self._subscribed.get(channel)
            if flag is not None and channel not in self._wanted:
                flag.clear()

    def _deliver(self, channel: bytes, event: ConversationEvent) -> None:
        if channel == self._owners:
            for listener in self._owner_listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("owner_listener_failed")
        elif channel != self._console:
            for sub in tuple(self._subs.get(event.conversation_id, ())):
                sub.offer(event)
            return
        for sub in tuple(self._all):
            if not sub.local_only:
                sub.offer(event)

    def _lost(self) -> None:
        for flag in self._subscribed.values():
            flag.clear()

    def _reconnected(self) -> None:
        """redis-py subscribed again on a new connection: what was published meanwhile never
        came. Close the streams that follow other processes (their clients resume from the
        database) and write the in-flight texts again (a restarted Redis lost them)."""
        self._lost()
        followers = [s for subs in self._subs.values() for s in subs]
        followers += [s for s in self._all if not s.local_only]
        log.warning("bus_reconnected", closed_streams=len(followers))
        for sub in followers:
            sub.close()
        for cid, written in list(self._written.items()):
            if cid in self._inflight:
                written.count = -1
                self._dirty.setdefault(cid, None)
            else:
                del self._written[cid]
        self._wake_sender.set()

    # -- sending ----------------------------------------------------------------------------

    def _queue(self, channel: bytes, message: bytes) -> None:
        self._outbox.append((channel, message))
        if len(self._outbox) > self._max_pending:
            self._outbox.popleft()
            self._dropped += 1
        self._wake_sender.set()

    async def _send(self) -> None:
        while not self._closing:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while (self._outbox or self._dirty) and not self._closing:
                if not await self._send_batch():
                    await asyncio.sleep(self._retry_s)

    async def _send_batch(self) -> bool:
        """One pipeline: the in-flight texts that changed, then the events. False when
        Redis is away (all of it is kept for the next try)."""
        batch, self._outbox = self._outbox, deque()
        dirty, self._dirty = self._dirty, {}
        pipe = self._redis.pipeline(transaction=False)
        for cid, ended in dirty.items():
            self._stage_inflight(pipe, cid, ended)
        for channel, message in batch:
            pipe.publish(channel, message)
        try:
            await pipe.execute()
        except REDIS_DOWN as e:
            self._retry_later(batch, dirty, e)
            return False
        except Exception:
            log.exception("bus_send_failed", events=len(batch))
            return True  # not a matter of waiting: drop it rather than retry forever
        if self._dropped:
            log.warning("bus_events_dropped", count=self._dropped)
            self._dropped = 0
        return True

    def _stage_inflight(self, pipe: Pipeline, cid: int, ended: int | None) -> None:
        key = self._inflight_key(cid)
        cur = self._inflight.get(cid)
        written = self._written.get(cid)
        if cur is None:
            if written is not None:
                del self._written[cid]
                if written.count >= 0:
                    pipe.delete(key)
                else:
                    pipe.eval(_DROP_IF_SEQ, 1, key, written.seq)
            elif ended is not None:
                # An answer another process streamed, finished here (recovery).
                pipe.eval(_DROP_IF_SEQ, 1, key, ended)
            return
        seq, deltas = cur
        if written is not None and written.deltas is deltas and 0 <= written.count:
            fresh = deltas[written.count :]
            if fresh:
                pipe.rpushx(key, *fresh)  # (gone meanwhile: late joiners wait for the final)
        else:
            pipe.delete(key)
            pipe.rpush(key, seq, *deltas)
        pipe.pexpire(key, self._inflight_ttl_ms)
        self._written[cid] = _Written(seq, deltas, len(deltas))

    def _retry_later(
        self, batch: deque[tuple[bytes, bytes]], dirty: dict[int, int | None], error: Exception
    ) -> None:
        if not self._dropped:
            log.warning("bus_send_waiting", error=repr(error), events=len(batch))
        for cid, ended in dirty.items():
            written = self._written.get(cid)
            if written is not None:
                written.count = -1
            if self._dirty.get(cid) is None:  # (a newer end stays)
                self._dirty[cid] = ended
        batch.extend(self._outbox)
        self._outbox = batch
        while len(self._outbox) > self._max_pending:
            self._outbox.popleft()
            self._dropped += 1


def mirror_taken(taken: set[int]) -> OwnerListener:
    """Keeps this process's `Parts.taken` in step with the moves other processes make, as
    `Host._move` does for its own: a person took the conversation -> the bot stops writing to
    it here at once. (Handoff requests and summaries are not moves: they leave it alone.)"""

    def follow(event: ConversationEvent) -> None:
        if event.data.get("action") not in MOVES:
            return
        if event.data.get("owner") == Owner.BOT.value:
            taken.discard(event.conversation_id)
        else:
            taken.add(event.conversation_id)

    return follow
