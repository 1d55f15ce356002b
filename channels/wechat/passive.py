"""The 5-second window: hand an answer to the webhook request that is still waiting for it.

WeChat waits 5 seconds for the HTTP answer to a callback and retries the same message up to
three times. For each inbound message (by its stored id) the board keeps who may deliver the
answer:

- `writing`: the bot is writing it; a webhook request (the first or a retry) may be waiting
  for it within its own window.
- `passive`: it was handed to a waiting request as the passive reply.
- `api`: it goes (or went) through the API; a retry now just gets `success`.
- `done`: nothing more will be sent (failed or abandoned).

Claiming is synchronous — checking the waiter and taking it happen in one step of the event
loop — so an answer is handed to exactly one of: a waiting request, or the API.

`PassiveBoard` is what the Official Account channel needs of a board: this one (one process)
or passive_shared.SharedAnswerBoard (several processes, the same rules kept in Redis).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol

Phase = Literal["writing", "passive", "api", "done"]

# How long the board remembers an answer after it was delivered: WeChat's retries of one
# message all arrive within about 15 seconds.
RETAIN_S = 120.0
PRUNE_EVERY_S = 5.0


class Ticket(Protocol):
    """The webhook request's side of a hand-over."""

    async def begin(self) -> bool:
        """Whether the request may still write the passive reply (False: the sink gave up
        waiting and the API has it)."""
        ...

    async def report(self, written: bool) -> None:
        """Whether the passive reply went out."""
        ...


class Handover(Protocol):
    """The sink's side of a hand-over."""

    async def delivered(self, timeout: float) -> bool:
        """Wait up to `timeout` s to hear that the request wrote the passive reply; False
        (not written, or nothing heard) means the sink sends the answer by the API."""
        ...


class PassiveBoard(Protocol):
    def expect(self, inbound_id: int) -> None:
        """A sink is about to write the answer to this message."""

    async def wait(self, inbound_id: int, budget: float) -> tuple[str | None, Ticket | None]: ...

    async def claim(self, inbound_id: int, text: str) -> Handover | None: ...

    async def to_api(self, inbound_id: int) -> None: ...

    async def abandon(self, inbound_id: int) -> None: ...

    async def window_left(self, inbound_id: int) -> float | None:
        """Seconds until the window of the request waiting now ends; None: none waits."""
        ...


@dataclass(slots=True, eq=False)
class Waiter:
    """One webhook request waiting for the answer until `until` (event-loop time)."""

    text: asyncio.Future[str]
    until: float
    # Set by the request once it wrote (True) or failed to write (False) the passive reply.
    written: asyncio.Future[bool]

    async def begin(self) -> bool:
        return not self.written.cancelled()

    async def report(self, written: bool) -> None:
        if not self.written.done():
            self.written.set_result(written)

    async def delivered(self, timeout: float) -> bool:
        try:
            return await asyncio.wait_for(asyncio.shield(self.written), timeout)
        except TimeoutError:
            self.written.cancel()
            return False


@dataclass(slots=True, eq=False)
class Slot:
    inbound_id: int
    phase: Phase = "writing"
    waiter: Waiter | None = None
    passive_text: str | None = None
    windows: int = 0  # webhook requests that waited (the first try and WeChat's retries)
    touched: float = field(default_factory=time.monotonic)


class AnswerBoard:
    def __init__(self) -> None:
        self._slots: dict[int, Slot] = {}
        self._pruned = time.monotonic()

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Slot]:
        return iter(self._slots.values())

    def slot(self, inbound_id: int) -> Slot:
        s = self._slots.get(inbound_id)
        if s is None:
            self._prune()
            s = self._slots[inbound_id] = Slot(inbound_id)
        s.touched = time.monotonic()
        return s

    def get(self, inbound_id: int) -> Slot | None:
        return self._slots.get(inbound_id)

    def expect(self, inbound_id: int) -> None:
        self.slot(inbound_id)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < PRUNE_EVERY_S:
            return  # amortized: one sweep every few seconds, not one per message
        self._pruned = now
        cutoff = now - RETAIN_S
        stale = [
            k
            for k, s in self._slots.items()
            if s.touched < cutoff and (s.phase != "writing" or s.waiter is None)
        ]
        for k in stale:
            del self._slots[k]

    def window_open(self, inbound_id: int) -> bool:
        """A webhook request is waiting for this answer right now."""
        s = self._slots.get(inbound_id)
        return bool(s and s.waiter and not s.waiter.text.done())

    def window_end(self, inbound_id: int) -> float | None:
        s = self._slots.get(inbound_id)
        if s and s.waiter and not s.waiter.text.done():
            return s.waiter.until
        return None

    async def window_left(self, inbound_id: int) -> float | None:
        end = self.window_end(inbound_id)
        if end is None:
            return None
        return max(end - asyncio.get_running_loop().time(), 0.0)

    # -- the webhook side -----------------------------------------------------------------

    async def wait(self, inbound_id: int, budget: float) -> tuple[str | None, Waiter | None]:
        """Wait up to `budget` s for the answer. (text, waiter): the caller writes `text` as
        the passive reply and then resolves `waiter.written`; (None, None): answer `success`.
        """
        s = self.slot(inbound_id)
        if s.phase == "passive" and s.passive_text is not None:
            # WeChat retries only when it did not get our reply: the passive answer was lost
            # on the way, so this request carries it again.
            return s.passive_text, None
        if s.phase != "writing" or budget <= 0:
            return None, None
        loop = asyncio.get_running_loop()
        if s.waiter is not None and not s.waiter.text.done():
            s.waiter.text.cancel()  # a retry supersedes a request WeChat gave up on
        waiter = Waiter(loop.create_future(), loop.time() + budget, loop.create_future())
        s.waiter = waiter
        s.windows += 1
        try:
            await asyncio.wait({waiter.text}, timeout=budget)
        finally:
            # No await from here on: either the answer was handed over, or the window closes
            # now and the sink will use the API.
            if not waiter.text.done():
                waiter.text.cancel()
            if s.waiter is waiter:
                s.waiter = None
        if waiter.text.cancelled():
            return None, None
        return waiter.text.result(), waiter

    # -- the sink side --------------------------------------------------------------------

    async def claim(self, inbound_id: int, text: str) -> Waiter | None:
        """Hand `text` to the waiting request, if there is one (then phase `passive`);
        otherwise the phase becomes `api` and the caller sends through the API."""
        s = self.slot(inbound_id)
        w = s.waiter
        if s.phase == "writing" and w is not None and not w.text.done():
            w.text.set_result(text)
            s.phase = "passive"
            s.passive_text = text
            return w
        if s.phase in ("writing", "passive"):
            s.phase = "api"
        return None

    async def to_api(self, inbound_id: int) -> None:
        """The answer goes through the API from now on (a retry gets `success`)."""
        s = self.slot(inbound_id)
        if s.waiter is not None and not s.waiter.text.done():
            s.waiter.text.cancel()
        s.waiter = None
        s.phase = "api"
        s.passive_text = None

    async def abandon(self, inbound_id: int) -> None:
        """Nothing will be sent for this message (the answer failed or a person took over)."""
        s = self.slot(inbound_id)
        if s.waiter is not None and not s.waiter.text.done():
            s.waiter.text.cancel()
        s.waiter = None
        s.phase = "done"


@dataclass(slots=True)
class SystemReplySlot:
    """A callback request that may carry one system message (a welcome text...) as its
    passive reply: the handler sets it around `host.send_message`, and the channel's `send`
    fills it instead of calling the API."""

    channel: str
    account: str
    chat_id: str
    text: str | None = None

    def take(self, channel: str, account: str, chat_id: str, text: str, limit: int) -> bool:
        if (
            self.text is None
            and (self.channel, self.account, self.chat_id) == (channel, account, chat_id)
            and len(text.encode("utf-8")) <= limit
        ):
            self.text = text
            return True
        return False


SYSTEM_REPLY: ContextVar[SystemReplySlot | None] = ContextVar("wechat_system_reply", default=None)
