"""Specialists started on the local router's guess while the paid classification runs.

A message the local router is unsure of waits ~1–2 s for a cheap model's classification
before any specialist would start. Instead the specialists of the router's own guess start
at once, held: nothing they write reaches the shopper and none of their ledger rows is sent
on until the classification is in. A run whose first request is exactly what the decided
turn would send (same tier, prompt, tools and deadline) is kept: its held text goes out at
once and it streams on as if it had been started then. Every other run is cancelled, and its
ledger rows are recorded with purpose `speculative`, so the waste shows in llm_calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestration.events import CallRecord, ReplyEvent
from orchestration.llm.types import ChatMessage
from orchestration.routing import RoutingDecision
from orchestration.shop_knowledge import TurnKnowledge
from orchestration.specialists import Specialist, SpecialistResult, TurnInput

# The ledger purpose of a call made on a guess that the classification overruled.
SPECULATIVE = "speculative"

Opening = tuple[str, list[ChatMessage], list[dict[str, Any]]]


class HeldRun:
    """One specialist's run whose text and ledger rows wait until it is kept or dropped."""

    def __init__(self, sp: Specialist, turn: TurnInput, tier: str, deadline: float) -> None:
        self.specialist = sp
        self.opening: Opening = sp.opening(turn, tier)
        self.deadline = deadline
        self.text = ""  # what it wrote while held (a failed attempt's text is taken out)
        self.records: list[CallRecord] = []
        self.wrote_at: float | None = None
        self._on_delta: Callable[[str], None] | None = None
        self._on_record: Callable[[CallRecord], None] | None = None
        self._seen: Callable[[str], bool] | None = None
        self._intent: str | None = None
        self.task: asyncio.Task[SpecialistResult] = asyncio.create_task(
            sp.run(turn, tier, deadline, self._record, on_delta=self._delta, seen=self._ask)
        )

    def _delta(self, delta: str) -> None:
        if self._on_delta is not None:
            self._on_delta(delta)
            return
        if self.wrote_at is None:
            self.wrote_at = time.monotonic()
        self.text += delta

    def _record(self, rec: CallRecord) -> None:
        if self._on_record is not None:
            self._on_record(replace(rec, intent=self._intent))
        else:
            self.records.append(rec)

    def _ask(self, text: str) -> bool:
        if self._seen is not None:
            return self._seen(text)
        # Nobody saw the failed attempt (its text is the held text's end): it is dropped and
        # the next model starts clean, as for an answer not yet shown.
        self.text = self.text[: len(self.text) - len(text)]
        return False

    def attach(
        self,
        on_delta: Callable[[str], None],
        on_record: Callable[[CallRecord], None],
        seen: Callable[[str], bool],
        intent: str | None,
    ) -> asyncio.Task[SpecialistResult]:
        """Kept: its held rows and text go out now, and what follows goes straight on."""
        self._intent = intent
        for rec in self.records:
            on_record(replace(rec, intent=intent))
        self.records.clear()
        self._on_record, self._seen = on_record, seen
        held, self.text = self.text, ""
        if held:
            on_delta(held)
        self._on_delta = on_delta
        return self.task

    async def stop(self, emit: Callable[[ReplyEvent], None]) -> None:
        """Stopped if still running; the calls it made while held (never kept) are recorded
        as speculative."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        for rec in self.records:
            emit(replace(rec, purpose=SPECULATIVE))
        self.records.clear()


@dataclass
class Speculation:
    """The runs started on one guess, and the turn's documents they were given."""

    guess: RoutingDecision
    chosen: Sequence[Specialist]
    # What the turn's documents were searched for (whether anyone reads them, whether the
    # message's parts were searched too); None until the search is done.
    searched: tuple[bool, bool] | None = None
    knowledge: TurnKnowledge | None = None
    runs: dict[Specialist, HeldRun] = field(default_factory=dict)  # not taken (yet)
    kept: list[HeldRun] = field(default_factory=list)
    starting: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """Wait for the runs to be started (the documents are searched first)."""
        if self.starting is not None:
            await asyncio.gather(self.starting, return_exceptions=True)

    def take(self, sp: Specialist, turn: TurnInput, tier: str, deadline: float) -> HeldRun | None:
        """The run of `sp` if it is exactly the one the decided turn would start."""
        run = self.runs.get(sp)
        if run is None or run.deadline != deadline or run.opening != sp.opening(turn, tier):
            return None
        del self.runs[sp]
        self.kept.append(run)
        return run

    @property
    def names(self) -> list[str]:
        return [sp.name for sp in self.chosen]

    async def drop_rest(self, emit: Callable[[ReplyEvent], None]) -> list[str]:
        """Drop every run not taken; the names of the specialists dropped."""
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
        await self.ready()
        dropped = list(self.runs.values())
        self.runs.clear()
        for run in dropped:
            await run.stop(emit)
        return [run.specialist.name for run in dropped]

    async def close(self, emit: Callable[[ReplyEvent], None]) -> None:
        """The turn is over, or stopped (a person took over): nothing started on the guess
        is left running, kept or not."""
        await self.drop_rest(emit)
        for run in self.kept:
            await run.stop(emit)
