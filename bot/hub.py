"""In-process event bus: live conversation events for the clients connected to this process.

Each subscriber has a bounded queue; a subscriber too slow to keep up is dropped (its client
reconnects and resumes from its last event id), so one stalled socket never slows a reply.
The bus also keeps the deltas of each answer still streaming, so a client that connects
mid-answer gets the text so far.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from channels.base import ConversationEvent

_CLOSED = object()


class HubSubscription:
    def __init__(self, hub: Hub, conversation_id: int | None, maxsize: int) -> None:
        self._hub = hub
        self.conversation_id = conversation_id
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.closed = False
        self.overflowed = False

    def offer(self, event: ConversationEvent) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._hub._remove(self)
        # Wake the reader even when the queue is full.
        while True:
            try:
                self._queue.put_nowait(_CLOSED)
                break
            except asyncio.QueueFull:
                self._queue.get_nowait()

    async def get(self, timeout: float | None = None) -> ConversationEvent | None:
        """The next event; None when `timeout` passes first. Raises EOFError once closed."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if item is _CLOSED:
            raise EOFError
        assert isinstance(item, ConversationEvent)
        return item

    async def __aiter__(self) -> AsyncIterator[ConversationEvent]:
        while True:
            try:
                event = await self.get()
            except EOFError:
                return
            if event is not None:
                yield event


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

    def subscribe_all(self) -> HubSubscription:
        """Every conversation's events (the agent console)."""
        sub = HubSubscription(self, None, self._queue_size * 10)
        self._all.add(sub)
        return sub

    def _remove(self, sub: HubSubscription) -> None:
        if sub.conversation_id is None:
            self._all.discard(sub)
            return
        subs = self._subs.get(sub.conversation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.conversation_id]

    def inflight(self, conversation_id: int) -> tuple[int, list[str]] | None:
        cur = self._inflight.get(conversation_id)
        return (cur[0], list(cur[1])) if cur else None

    def publish(self, event: ConversationEvent) -> None:
        cid = event.conversation_id
        if event.type == "delta":
            cur = self._inflight.get(cid)
            if cur is None or cur[0] != event.seq:
                cur = (event.seq, [])
                self._inflight[cid] = cur
            cur[1].append(str(event.data.get("text", "")))
        elif event.type in ("final", "error"):
            cur = self._inflight.get(cid)
            if cur is not None and cur[0] == event.seq:
                del self._inflight[cid]
        for sub in list(self._subs.get(cid, ())):
            sub.offer(event)
        for sub in list(self._all):
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
