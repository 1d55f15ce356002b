"""In-process event bus: live conversation events for the clients connected to this process.

Each subscriber has a bounded queue; a subscriber too slow to keep up is dropped (its client
reconnects and resumes from its last event id), so one stalled socket never slows a reply.
The bus also keeps the deltas of each answer still streaming, so a client that connects
mid-answer gets the text so far.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator

from channels.base import ConversationEvent

# How late a timer may run against the deadline it was set for (clock granularity).
_TIMER_SLACK_S = 0.001


class HubSubscription:
    """A bounded queue of one subscriber's events.

    Cheap on the hot path (one event per delta per subscriber): a deque and one waiter
    future, and `get(timeout)` keeps a single timer armed across calls instead of setting
    one up per call — a stream asks for its events with the same heartbeat timeout over
    and over, and the timer only has to fire when the stream went quiet for that long.
    """

    def __init__(
        self, hub: Hub, conversation_id: int | None, maxsize: int, local_only: bool = False
    ) -> None:
        self._hub = hub
        self.conversation_id = conversation_id
        # Only this process's events (subscribe_all(local_only=True)); see Hub.subscribe_all.
        self.local_only = local_only
        self._items: deque[ConversationEvent] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[bool] | None = None  # result: True if timed out
        self._deadline = 0.0  # loop time at which the waiting get() gives up
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.overflowed = False

    async def ready(self) -> None:
        """Returns once events published from now on reach this subscription, whichever
        process publishes them (at once in one process; see bot/distributed/bus.py)."""
        await self._hub._ready(self)

    def offer(self, event: ConversationEvent) -> None:
        if self.closed:
            return
        if len(self._items) >= self._maxsize:
            self.overflowed = True
            self.close()
            return
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._hub._remove(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waiting: the next waiting get() arms the timer again
        loop = waiter.get_loop()
        if loop.time() + _TIMER_SLACK_S >= self._deadline:
            waiter.set_result(True)
        else:  # events came meanwhile and moved the deadline on
            self._timer = loop.call_at(self._deadline, self._expire)

    async def get(self, timeout: float | None = None) -> ConversationEvent | None:
        """The next event; None when `timeout` passes first. Raises EOFError once closed
        (after the events queued before)."""
        while True:
            if self._items:
                return self._items.popleft()
            if self.closed:
                raise EOFError
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            if timeout is not None:
                self._deadline = deadline = loop.time() + timeout
                timer = self._timer
                if timer is None or timer.when() > deadline:
                    if timer is not None:
                        timer.cancel()
                    self._timer = loop.call_at(deadline, self._expire)
            self._waiter = waiter
            try:
                timed_out = await waiter
            finally:
                self._waiter = None
            if timed_out and not self._items:
                return None

    async def __aiter__(self) -> AsyncIterator[ConversationEvent]:
        while True:
            try:
                event = await self.get()
            except EOFError:
                return
            if event is not None:
                yield event


def owner_event(
    conversation_id: int, owner: str, action: str, reason: str | None = None
) -> ConversationEvent:
    """A conversation's owner changed (for the console and the shop's webhooks)."""
    data = {"conversation_id": conversation_id, "owner": owner, "action": action}
    if reason is not None:
        data["reason"] = reason
    return ConversationEvent(conversation_id, "owner", 0, None, data)


class Hub:
    def __init__(self, queue_size: int = 1000) -> None:
        self._subs: dict[int, set[HubSubscription]] = defaultdict(set)
        self._all: set[HubSubscription] = set()
        self._inflight: dict[int, tuple[int, list[str]]] = {}
        self._queue_size = queue_size

    def subscribe(self, conversation_id: int) -> HubSubscription:
        sub = HubSubscription(self, conversation_id, self._queue_size)
        self._subs[conversation_id].add(sub)
        return sub

    def subscribe_all(self, local_only: bool = False) -> HubSubscription:
        """Every conversation's events (the agent console). `local_only`: only the events
        this process makes, for work that each process must do once for its own events
        (the outgoing webhooks); the same as any other in one process."""
        sub = HubSubscription(self, None, self._queue_size * 10, local_only)
        self._all.add(sub)
        return sub

    async def _ready(self, sub: HubSubscription) -> None:
        """In one process a subscription gets every event from the moment it is made."""

    def _remove(self, sub: HubSubscription) -> None:
        if sub.conversation_id is None:
            self._all.discard(sub)
            return
        subs = self._subs.get(sub.conversation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.conversation_id]

    def forget_inflight(self, conversation_id: int) -> None:
        """The answer streaming is being redone (a failed turn tried again): a client that
        connects meanwhile gets the new try's text, not both tries' run together."""
        self._inflight.pop(conversation_id, None)

    def inflight(self, conversation_id: int) -> tuple[int, list[str]] | None:
        """(seq, deltas so far) of the answer this process is streaming, if any."""
        cur = self._inflight.get(conversation_id)
        return (cur[0], list(cur[1])) if cur else None

    async def answer_so_far(self, conversation_id: int) -> tuple[int, list[str]] | None:
        """(seq, deltas so far) of the answer being streamed right now, whichever process
        streams it (here: this one)."""
        return self.inflight(conversation_id)

    def publish(self, event: ConversationEvent) -> None:
        cid = event.conversation_id
        if event.type == "delta":
            cur = self._inflight.get(cid)
            if cur is None or cur[0] != event.seq:
                cur = (event.seq, [])
                self._inflight[cid] = cur
            cur[1].append(str(event.data.get("text", "")))
        elif event.type == "typing":
            # The answer has begun: a client connecting before its first delta learns so.
            cur = self._inflight.get(cid)
            if cur is None or cur[0] != event.seq:
                self._inflight[cid] = (event.seq, [])
        elif event.type in ("final", "error"):
            cur = self._inflight.get(cid)
            if cur is not None and cur[0] == event.seq:
                del self._inflight[cid]
        subs = self._subs.get(cid)
        if subs:
            for sub in tuple(subs):  # a copy: an overflowing subscriber removes itself
                sub.offer(event)
        if self._all and event.durable:
            # The console follows stored messages, not every answer's pieces.
            for sub in tuple(self._all):
                sub.offer(event)

    def signal(self, event: ConversationEvent) -> None:
        """A passing hint for the conversation's clients (a person typing): no bookkeeping,
        nothing replayed to a client that connects later."""
        for sub in tuple(self._subs.get(event.conversation_id, ())):
            sub.offer(event)

    def announce(self, event: ConversationEvent) -> None:
        """An event for the agent console only (`subscribe_all`): an owner change, a note."""
        for sub in tuple(self._all):
            sub.offer(event)

    def close_all(self) -> None:
        """On shutdown: end every stream so the server can stop."""
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close()
        for sub in list(self._all):
            sub.close()

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values()) + len(self._all)
