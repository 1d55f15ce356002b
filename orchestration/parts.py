"""One answer from the specialists of a multi-part message, joined as they finish.

The first specialist to write streams at once, whichever it is; every other part follows
whole as soon as it is done and the streaming one has ended, each once (a sentence already
said is not said again), so the answer is whole when its slowest specialist is. Specialists
that may contradict each other (`reply.conflicting_specialists`) wait for the most
authoritative of their group, which answers like any other part; only where it and another
of the group both state money figures does a model write that other's part, agreeing with
what was already sent. Everything else is joined without a model call. Specialists started
on a routing guess and kept (orchestration/speculation.py) join already running.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from orchestration.answer_text import AnswerText
from orchestration.specialists import Specialist, SpecialistResult, TurnInput
from orchestration.speculation import HeldRun

# (findings of the group's other specialists, the text already sent) -> their part written
# to agree with it; None when no model could write it.
Compose = Callable[[Sequence[SpecialistResult], str], Awaitable[str | None]]

# An amount of money or a price cut: "¥50.00", "$5", "409.00元", "20% off", "8折".
_MONEY = re.compile(
    r"[¥￥$€£]\s?\d|\d[\d,.]*\s?(?:元|块|%|％|折|(?:RMB|CNY|USD|EUR|yuan)\b)", re.IGNORECASE
)
# Where a sentence ends: CJK marks at once, Latin ones before a space, and at a line break.
_SENTENCE_END = re.compile(r"((?<=[。！？；])\s*|(?<=[.!?;])\s+|\n+)")


def states_money(text: str) -> bool:
    return _MONEY.search(text) is not None


def _norm(sentence: str) -> str:
    return " ".join(sentence.split())


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)[::2]) if s]


def unsaid(text: str, said: str) -> str:
    """`text` without the sentences `said` already has (agreeing specialists, the same
    closing question at the end of every part), its own spacing kept."""
    known = {_norm(s) for s in sentences(said)}
    pieces = _SENTENCE_END.split(text)  # sentence, separator, sentence, ...
    kept: list[str] = []
    for i in range(0, len(pieces), 2):
        sentence, sep = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else ""
        key = _norm(sentence)
        if key and key in known:
            continue
        known.add(key)
        kept.append(sentence + sep)
    return "".join(kept).strip()


def conflict_leaders(
    chosen: Sequence[Specialist], conflict_groups: Sequence[Sequence[str]]
) -> dict[Specialist, Specialist]:
    """Each specialist that must wait for its group's most authoritative one -> that one."""
    leader_of: dict[Specialist, Specialist] = {}
    for group in conflict_groups:
        members = [sp for sp in chosen if sp.name in group]
        if len(members) > 1:
            leader = max(members, key=lambda sp: sp.settings.priority)
            for sp in members:
                if sp is not leader:
                    leader_of.setdefault(sp, leader)
    return leader_of


def run_deadlines(
    chosen: Sequence[Specialist],
    conflict_groups: Sequence[Sequence[str]],
    deadline: float,
    reserve: float,
) -> dict[Specialist, float]:
    """When each of a turn's specialists must be done: members of a conflict group early
    enough (`reserve`) for a model to reconcile them, the others by the turn's deadline."""
    leaders = conflict_leaders(chosen, conflict_groups) if len(chosen) > 1 else {}
    grouped = set(leaders) | set(leaders.values())
    return {sp: deadline - reserve if sp in grouped else deadline for sp in chosen}


class PartsJoin:
    def __init__(
        self,
        chosen: Sequence[Specialist],
        conflict_groups: Sequence[Sequence[str]],
        out: AnswerText,
        compose: Compose,
    ) -> None:
        self.chosen = list(chosen)
        self.out = out
        self.compose = compose
        self.leader_of = conflict_leaders(self.chosen, conflict_groups)
        self.live: Specialist | None = None  # the one whose text streams
        self.results: dict[Specialist, SpecialistResult] = {}
        self.placed: set[Specialist] = set()

    def _on_delta(self, sp: Specialist) -> Callable[[str], None]:
        def take(delta: str) -> None:
            if self.live is None and sp not in self.leader_of:
                self.live = sp
            if self.live is sp:
                self.out.add(delta)
            # (anyone else's text goes out whole once it is done: see _settle)

        return take

    def _seen(self, sp: Specialist) -> Callable[[str], bool]:
        def ask(text: str) -> bool:
            # Only the streaming part can have been seen; another's failed attempt is
            # dropped and its next model starts clean.
            return self.out.seen(text) if self.live is sp else False

        return ask

    async def run(
        self,
        turn: TurnInput,
        tier: str,
        deadline: float,
        deadlines: Mapping[Specialist, float],
        held: Mapping[Specialist, HeldRun] | None = None,
    ) -> list[SpecialistResult]:
        """The specialists' results, in the order of the message's parts; the answer is in
        `out`. Each finishes by its `deadlines` entry; the `held` ones (started on a routing
        guess) are already running, and the one that wrote first leads."""
        started = time.monotonic()
        held = held or {}
        intent = turn.intents[0] if turn.intents else None
        tasks: dict[asyncio.Task[SpecialistResult], Specialist] = {}
        for run in sorted(held.values(), key=lambda r: (r.wrote_at is None, r.wrote_at or 0.0)):
            sp = run.specialist
            task = run.attach(self._on_delta(sp), self.out.record, self._seen(sp), intent)
            tasks[task] = sp
        for sp in self.chosen:
            if sp not in held:
                task = asyncio.create_task(
                    sp.run(
                        turn,
                        tier,
                        deadlines[sp],
                        self.out.record,
                        on_delta=self._on_delta(sp),
                        seen=self._seen(sp),
                    )
                )
                tasks[task] = sp
        pending = set(tasks)
        try:
            while pending and (left := deadline - time.monotonic()) > 0:
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    sp = tasks[task]
                    ok = not task.cancelled() and task.exception() is None
                    self.results[sp] = (
                        task.result() if ok else sp.degraded(turn, time.monotonic() - started)
                    )
                await self._settle(turn, final=False)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for sp in self.chosen:
            if sp not in self.results:
                self.results[sp] = sp.degraded(turn, time.monotonic() - started)
        await self._settle(turn, final=True)
        return [self.results[sp] for sp in self.chosen]

    def _text(self, sp: Specialist, turn: TurnInput) -> str:
        res = self.results[sp]
        # (a failed part that never streamed: its degraded text, not an earlier round's words)
        return res.text if res.ok else sp.degraded(turn).text

    def _place(self, text: str) -> None:
        rest = unsaid(text, self.out.text)
        if rest:
            self.out.add(rest, separate=True)

    async def _settle(self, turn: TurnInput, *, final: bool) -> None:
        """Send every part that is ready to go, in the message's order."""
        if self.live is not None:
            if self.live not in self.results:
                return  # the first part is still being written
            if self.live not in self.placed and self.out.shown:
                self.placed.add(self.live)
                if not self.results[self.live].ok:
                    self.out.broken = True  # cut mid-answer and nothing could continue it
            # (else its attempt was withdrawn unseen and it failed: its degraded text goes
            # in the message's order below)
        elif not final:
            return  # nobody has written yet (what finished failed, or waits for a leader)
        for sp in self.chosen:
            if sp in self.results and sp not in self.placed and sp not in self.leader_of:
                self.placed.add(sp)
                self._place(self._text(sp, turn))
        for leader in dict.fromkeys(self.leader_of.values()):
            group = [f for f, lead in self.leader_of.items() if lead is leader]
            if leader not in self.placed or any(f not in self.results for f in group):
                continue
            waiting = [f for f in group if f not in self.placed]
            self.placed.update(waiting)
            await self._reconcile(leader, waiting, turn)

    async def _reconcile(
        self, leader: Specialist, others: Sequence[Specialist], turn: TurnInput
    ) -> None:
        said = self.results[leader]
        clash = [
            f
            for f in others
            if said.ok
            and self.results[f].ok
            and states_money(said.text)
            and states_money(self.results[f].text)
        ]
        if clash:
            composed = await self.compose([self.results[f] for f in clash], self.out.text)
            if composed is None:
                clash = []  # no model could: the findings themselves
            else:
                self._place(composed)
        for f in others:
            if f not in clash:
                self._place(self._text(f, turn))
