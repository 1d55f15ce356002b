"""The live event bus across processes (queue.backend: redis): `RedisHub`, the in-process
`Hub` with Redis pub/sub behind it, so a shopper's socket or SSE stream and the agent console
get every event whichever process made it.

Channels (names under the key prefix):
- `bus:c:<conversation id>`: the events of one conversation. A process SUBSCRIBEs to it only
  while it holds a client of that conversation.
- `bus:console`: stored messages (durable events) and notes, for the agent console.
- `bus:owners`: owner changes; every process listens (they are rare): they update the set of
  conversations a person took (`Parts.taken`, see `mirror_taken`) and reach the console.
- `bus:watch`: who follows what. A process announces the conversations it follows (and whether
  it has a console open) once Redis confirmed its subscription, and again every
  `announce_s`; every process listens.

Publishing only to followers: an answer's deltas are most of the events, and most answers are
followed by a client on the process that writes them. So a process publishes a
conversation's events only while another process follows it, and console events only while
another process has a console open — one process alone, or one whose clients are all local,
sends nothing. The follower is never short of an event for it: when a process learns that a
conversation is followed elsewhere it first sends again, on the conversation's channel, what
the follower may have missed while the news travelled (the answer streaming so far, and the
stored-message events of the last `recent_s` seconds); the follower subscribed before
announcing, and its clients' cursors drop what they have. A process that (re)connects to
Redis does not know who follows what yet: it publishes everything for `grace_s` and asks the
others to announce again.

Local subscribers get local events directly, as from `Hub`; a message carries the name of the
process that sent it, and a process skips its own. Publishing never waits for Redis: events
queue up and a background sender sends what a loop tick gathered in one pipeline, in order
(one sender, one connection: the order per conversation holds).

A process keeps the text of the answers streaming elsewhere to the conversations it follows
(from the events it receives), so a second client connecting mid-answer gets the text so far
without asking Redis (`answer_so_far`).

When Redis is down or restarts: local delivery goes on; the sender keeps up to `max_pending`
events and sends them once Redis is back (older ones are dropped and logged); redis-py
reconnects and subscribes again, and then every stream that relied on other processes' events
is closed — its client reconnects and resumes from the database by its last event id, as
after any dropped stream. An owner change made during the outage is caught at the latest by
the database check when the answer is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog

from bot.hub import Hub, HubSubscription
from channels.base import ConversationEvent
from cluster.redis import REDIS_DOWN, RedisParts
from storage.handoff import MOVES
from storage.models import Owner

log = structlog.get_logger(__name__)

OwnerListener = Callable[[ConversationEvent], None]


class _Followers:
    """What the other processes follow, as they announced it on `bus:watch`."""

    __slots__ = ("by_process", "consoles", "conversations", "heard")

    def __init__(self) -> None:
        self.by_process: dict[bytes, set[int]] = {}
        self.conversations: dict[int, int] = {}  # conversation id -> processes following it
        self.consoles: set[bytes] = set()
        self.heard: dict[bytes, float] = {}

    def update(self, origin: bytes, note: dict[str, Any], now: float) -> tuple[set[int], bool]:
        """Apply `origin`'s announcement. Returns the conversations to send again (those it
        subscribed to just now, or newly follows) and whether its console is new."""
        self.heard[origin] = now
        mine = self.by_process.setdefault(origin, set())
        added = {int(c) for c in note.get("a", ())}
        if note.get("f"):
            dropped = mine - added
            replay = (added - mine) | {int(c) for c in note.get("r", ())}
        else:
            dropped = {int(c) for c in note.get("d", ())}
            replay = added
        for cid in added - mine:
            self.conversations[cid] = self.conversations.get(cid, 0) + 1
        mine |= added
        self._drop(mine, dropped & mine)
        console = bool(note.get("k"))
        new_console = console and origin not in self.consoles
        if console:
            self.consoles.add(origin)
        else:
            self.consoles.discard(origin)
        return replay, new_console

    def forget(self, origin: bytes) -> None:
        self._drop(self.by_process.pop(origin, set()), None)
        self.consoles.discard(origin)
        self.heard.pop(origin, None)

    def silent_since(self, before: float) -> list[bytes]:
        return [origin for origin, at in self.heard.items() if at < before]

    def _drop(self, mine: set[int], cids: set[int] | None) -> None:
        for cid in list(mine if cids is None else cids):
            mine.discard(cid)
            left = self.conversations.get(cid, 0) - 1
            if left > 0:
                self.conversations[cid] = left
            else:
                self.conversations.pop(cid, None)


class RedisHub(Hub):
    """`Hub` across processes. `start()` before use, `aclose()` at shutdown."""

    def __init__(
        self,
        cluster: RedisParts,
        queue_size: int = 1000,
        *,
        ready_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        max_pending: int = 50_000,
        recent_s: float = 15.0,
        grace_s: float = 3.0,
        announce_s: float = 30.0,
    ) -> None:
        super().__init__(queue_size)
        self._redis = cluster.bus
        self._keys = cluster.keys
        self._origin = cluster.process.encode()
        self._owners = self._keys("bus", "owners").encode()
        self._console = self._keys("bus", "console").encode()
        self._watch = self._keys("bus", "watch").encode()
        self._conversation_prefix = self._keys("bus", "c", "").encode()
        self._ready_timeout_s = ready_timeout_s
        self._retry_s = retry_s
        self._max_pending = max_pending
        self._recent_s = recent_s
        self._grace_s = grace_s
        self._announce_s = announce_s
        self._pubsub = self._redis.pubsub()
        # Subscriptions: the channels wanted now; one event per channel, set while Redis
        # confirmed the subscription on the current connection.
        self._wanted: set[bytes] = {self._owners, self._watch}
        self._subscribed: dict[bytes, asyncio.Event] = {}
        self._watch_confirmations = 0
        self._remote_all = 0  # console subscribers that follow every process
        self._owner_listeners: list[OwnerListener] = []
        # Who follows what elsewhere; until `_open_until` (monotonic) everything is published.
        self._followers = _Followers()
        self._open_until = 0.0
        # What this process announces next: conversations subscribed to just now, and
        # unsubscribed; the whole set; a request that the others announce theirs.
        self._add: set[int] = set()
        self._drop: set[int] = set()
        self._full = False
        self._ask = False
        # Durable events of the last `recent_s` seconds per conversation, and notes, sent
        # again to a follower that announces itself; the text of answers streaming elsewhere
        # to the conversations followed here.
        self._recent: dict[int, deque[ConversationEvent]] = {}
        self._recent_notes: deque[ConversationEvent] = deque()
        self._mirror: dict[int, tuple[int, list[str]]] = {}
        # What the sender sends next: (channel, message) in publish order.
        self._outbox: deque[tuple[bytes, bytes]] = deque()
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
            asyncio.create_task(self._keep(), name="bus-keeper"),
        ]
        self._wake_control.set()

    async def aclose(self, flush_s: float = 2.0) -> None:
        """Send what is still queued (for up to `flush_s`), tell the others this process
        follows nothing any more, then stop."""
        self._queue(self._watch, self._origin + b"\n" + orjson.dumps({"f": 1, "a": [], "k": 0}))
        deadline = time.monotonic() + flush_s
        while self._outbox and time.monotonic() < deadline and self._tasks:
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
        cid = event.conversation_id
        message = None
        if event.durable:
            self._remember(cid, event)
            if self._console_followed():
                message = self._encode(event)
                self._queue(self._console, message)
        if self._followed(cid):
            self._queue(self._channel(cid), message or self._encode(event))

    def signal(self, event: ConversationEvent) -> None:
        super().signal(event)
        if self._followed(event.conversation_id):
            self._queue(self._channel(event.conversation_id), self._encode(event))

    def announce(self, event: ConversationEvent) -> None:
        super().announce(event)
        if event.type == "owner":
            self._queue(self._owners, self._encode(event))
            return
        self._recent_notes.append(event)
        _prune(self._recent_notes, time.monotonic() - self._recent_s)
        if self._console_followed():
            self._queue(self._console, self._encode(event))

    async def answer_so_far(self, conversation_id: int) -> tuple[int, list[str]] | None:
        local = self.inflight(conversation_id)
        if local is not None:
            return local
        mirrored = self._mirror.get(conversation_id)
        return (mirrored[0], list(mirrored[1])) if mirrored else None

    # -- who follows what -----------------------------------------------------------------

    def followed_elsewhere(self, conversation_id: int) -> bool:
        """Whether another process announced that it follows the conversation."""
        return conversation_id in self._followers.conversations

    def console_elsewhere(self) -> bool:
        """Whether another process announced an open agent console."""
        return bool(self._followers.consoles)

    def _followed(self, conversation_id: int) -> bool:
        return conversation_id in self._followers.conversations or (
            time.monotonic() < self._open_until
        )

    def _console_followed(self) -> bool:
        return bool(self._followers.consoles) or time.monotonic() < self._open_until

    def _remember(self, conversation_id: int, event: ConversationEvent) -> None:
        recent = self._recent.get(conversation_id)
        if recent is None:
            recent = self._recent[conversation_id] = deque()
        recent.append(event)
        _prune(recent, event.at - self._recent_s)

    def _following_here(self) -> list[int]:
        return [
            cid
            for ch, flag in self._subscribed.items()
            if flag.is_set() and ch in self._wanted and (cid := self._cid(ch)) is not None
        ]

    def _console_here(self) -> bool:
        flag = self._subscribed.get(self._console)
        return self._console in self._wanted and flag is not None and flag.is_set()

    def _note(self) -> bytes | None:
        """This process's announcement of what changed in what it follows, if anything."""
        if not (self._add or self._drop or self._full or self._ask):
            return None
        body: dict[str, Any] = {"k": int(self._console_here())}
        if self._full:
            body["f"] = 1
            body["a"] = self._following_here()
            if self._add:
                body["r"] = list(self._add)
        else:
            if self._add:
                body["a"] = list(self._add)
            if self._drop:
                body["d"] = list(self._drop)
        if self._ask:
            body["q"] = 1
        self._add, self._drop, self._full, self._ask = set(), set(), False, False
        return self._origin + b"\n" + orjson.dumps(body)

    def _on_note(self, message: bytes) -> None:
        origin, _, body = message.partition(b"\n")
        if origin == self._origin:
            return
        try:
            note: dict[str, Any] = orjson.loads(body)
            replay, new_console = self._followers.update(origin, note, time.monotonic())
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            log.warning("bus_note_unreadable", origin=origin.decode(errors="replace"))
            return
        for cid in replay:
            self._replay(cid)
        if new_console:
            self._replay_console()
        if note.get("q"):
            self._full = True
            self._wake_sender.set()

    def _replay(self, conversation_id: int) -> None:
        """Send again what a follower that announced itself just now may have missed: the
        conversation's recent stored-message events, then the answer streaming here so far."""
        channel = self._channel(conversation_id)
        recent = self._recent.get(conversation_id)
        if recent:
            _prune(recent, time.monotonic() - self._recent_s)
            for event in recent:
                self._queue(channel, self._encode(event))
        cur = self._inflight.get(conversation_id)
        if cur is None:
            return
        seq, deltas = cur
        if not deltas:
            self._queue(channel, self._encode(ConversationEvent(conversation_id, "typing", seq)))
        for i, text in enumerate(deltas):
            event = ConversationEvent(conversation_id, "delta", seq, i, {"text": text})
            self._queue(channel, self._encode(event))

    def _replay_console(self) -> None:
        since = time.monotonic() - self._recent_s
        events = [e for recent in self._recent.values() for e in recent if e.at >= since]
        events += [e for e in self._recent_notes if e.at >= since]
        for event in sorted(events, key=lambda e: e.at):
            self._queue(self._console, self._encode(event))

    async def _keep(self) -> None:
        """Announce the whole set now and then (a note lost in an outage is made good, and
        the others know this process is alive); forget processes gone silent and old events."""
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(min(self._announce_s, self._recent_s) / 2)
            now = time.monotonic()
            if now - last >= self._announce_s:
                last = now
                self._full = True
                self._wake_sender.set()
            for origin in self._followers.silent_since(now - 3 * self._announce_s):
                log.info("bus_follower_gone", process=origin.decode(errors="replace"))
                self._followers.forget(origin)
            since = now - self._recent_s
            for cid in [c for c, recent in self._recent.items() if _prune(recent, since)]:
                del self._recent[cid]
            _prune(self._recent_notes, since)

    # -- names and messages ---------------------------------------------------------------

    def _channel(self, conversation_id: int) -> bytes:
        return self._conversation_prefix + str(conversation_id).encode()

    def _cid(self, channel: bytes) -> int | None:
        if not channel.startswith(self._conversation_prefix):
            return None
        try:
            return int(channel[len(self._conversation_prefix) :])
        except ValueError:
            return None

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
                    self._left(gone)
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

    def _left(self, channels: Iterable[bytes]) -> None:
        """No longer following `channels`: forget them, and tell the others."""
        for ch in channels:
            self._subscribed.pop(ch, None)
            cid = self._cid(ch)
            if cid is not None:
                self._mirror.pop(cid, None)
                self._add.discard(cid)
                self._drop.add(cid)
            elif ch == self._console:
                self._full = True  # (carries the console flag)
        self._wake_sender.set()

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
            if channel == self._watch:
                self._on_note(msg["data"])
                return
            event = self._decode(msg["data"])
            if event is not None:
                self._deliver(channel, event)
        elif kind == "subscribe":
            self._flag(channel).set()
            if channel == self._watch:
                self._connected()
            elif channel == self._console:
                self._full = True
                self._wake_sender.set()
            else:
                cid = self._cid(channel)
                if cid is not None:
                    self._drop.discard(cid)
                    self._add.add(cid)
                    self._wake_sender.set()
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
            self._mirror_event(event)
            for sub in tuple(self._subs.get(event.conversation_id, ())):
                sub.offer(event)
            return
        for sub in tuple(self._all):
            if not sub.local_only:
                sub.offer(event)

    def _mirror_event(self, event: ConversationEvent) -> None:
        """Keep the text of an answer another process streams (for `answer_so_far`)."""
        cid, kind = event.conversation_id, event.type
        cur = self._mirror.get(cid)
        if kind == "delta":
            if cur is None or cur[0] != event.seq:
                cur = self._mirror[cid] = (event.seq, [])
            deltas, index = cur[1], event.index or 0
            if index == 0:
                deltas.clear()  # the answer sent again from its start, or tried anew
            if index == len(deltas):
                deltas.append(str(event.data.get("text", "")))
        elif kind == "typing":
            if cur is None or cur[0] != event.seq:
                self._mirror[cid] = (event.seq, [])
        elif kind in ("final", "error") and cur is not None and cur[0] == event.seq:
            del self._mirror[cid]

    def _lost(self) -> None:
        for flag in self._subscribed.values():
            flag.clear()

    def _connected(self) -> None:
        """The watch channel is (again) subscribed: until the others have told us what they
        follow, publish everything, and ask them."""
        self._watch_confirmations += 1
        self._open_until = time.monotonic() + self._grace_s
        self._full = self._ask = True
        if self._watch_confirmations > 1:
            self._reconnected()
        self._wake_sender.set()

    def _reconnected(self) -> None:
        """redis-py subscribed again on a new connection: what was published meanwhile never
        came. Close the streams that follow other processes (their clients resume from the
        database); the subscriptions confirmed again are announced again, so the others
        send what is streaming to them once more."""
        self._mirror.clear()
        followers = [s for subs in self._subs.values() for s in subs]
        followers += [s for s in self._all if not s.local_only]
        log.warning("bus_reconnected", closed_streams=len(followers))
        for sub in followers:
            sub.close()

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
            while (self._outbox or self._add or self._drop or self._full or self._ask) and (
                not self._closing
            ):
                if not await self._send_batch():
                    await asyncio.sleep(self._retry_s)

    async def _send_batch(self) -> bool:
        """One pipeline: this process's announcement, then the events. False when Redis is
        away (all of it is kept for the next try)."""
        add, drop, full, ask = set(self._add), set(self._drop), self._full, self._ask
        note = self._note()
        batch, self._outbox = self._outbox, deque()
        pipe = self._redis.pipeline(transaction=False)
        if note is not None:
            pipe.publish(self._watch, note)
        for channel, message in batch:
            pipe.publish(channel, message)
        try:
            await pipe.execute()
        except REDIS_DOWN as e:
            self._retry_later(batch, e)
            # The announcement again, with what changed meanwhile on top.
            self._add |= add - self._drop
            self._drop |= drop - self._add
            self._full |= full
            self._ask |= ask
            return False
        except Exception:
            log.exception("bus_send_failed", events=len(batch))
            return True  # not a matter of waiting: drop it rather than retry forever
        if self._dropped:
            log.warning("bus_events_dropped", count=self._dropped)
            self._dropped = 0
        return True

    def _retry_later(self, batch: deque[tuple[bytes, bytes]], error: Exception) -> None:
        if not self._dropped:
            log.warning("bus_send_waiting", error=repr(error), events=len(batch))
        batch.extend(self._outbox)
        self._outbox = batch
        while len(self._outbox) > self._max_pending:
            self._outbox.popleft()
            self._dropped += 1


def _prune(events: deque[ConversationEvent], before: float) -> bool:
    """Drop the events older than `before`; True if none is left."""
    while events and events[0].at < before:
        events.popleft()
    return not events


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
