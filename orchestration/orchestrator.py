"""The orchestration entry point: `Orchestrator.reply` turns a shopper's message into a stream
of reply events (DESIGN.md, Data flow step 5, Orchestration).

A turn: route the message (rules and FAQ first, a local classifier next, a paid classification
only when unclear); check the budgets; run the specialists of the message's intents in
parallel under one deadline; stream a single specialist's answer directly; join the answers of
several in the order of the message's parts, the first streaming as it is written, and ask a
model to compose one answer only where specialists may contradict each other; escalate when
asked to. It never raises to the caller: a failure becomes a fallback model, a degraded text,
then an escalation — and a turn ending in a handoff says so with the handoff text.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from knowledge.base import KnowledgeSearch, Passage
from orchestration.budgets import Budgets, BudgetState
from orchestration.config import BudgetSettings, ReplySettings, SpecialistSettings
from orchestration.events import (
    CallRecord,
    ConversationInfo,
    Delta,
    Escalate,
    Final,
    ReplyEvent,
    Retract,
    Turn,
    Visibility,
)
from orchestration.language import pick
from orchestration.llm.types import ChatMessage
from orchestration.routing import LlmClassify, Router, RoutingDecision
from orchestration.runner import CallSpec, ModelRunner
from orchestration.shop_knowledge import (
    SEARCH_KNOWLEDGE,
    TurnKnowledge,
    merge_found,
    question_parts,
)
from orchestration.specialists import Specialist, SpecialistResult, TurnInput
from orchestration.tools import ToolRunner

log = structlog.get_logger(__name__)

AGGREGATE_PROMPT = (
    "You are the shop's customer-service assistant. Colleagues looked into the shopper's "
    "message; their findings follow, most authoritative first. Write ONE short reply in the "
    "shopper's language that answers every part of the message using only these findings. "
    "Where findings disagree, follow the earlier one; on prices and discounts the pricing "
    "specialist is always right."
)

_Emit = Callable[[ReplyEvent], None]
# Passages a multi-part message's specialists read at most (its parts searched one by one).
MAX_MERGED = 6
# The longest wait for the shop's documents before the specialists start without them (a
# search takes milliseconds; only a first index build of a large collection takes longer).
KNOWLEDGE_WAIT_SECONDS = 3.0
# Order numbers a human agent will want on the handoff card.
_ORDER_ID = re.compile(r"\b(?:ORD|SO|TB|JD)-?\d{4,}\b", re.IGNORECASE)


class Orchestrator:
    def __init__(
        self,
        runner: ModelRunner,
        router: Router,
        specialists: Sequence[SpecialistSettings],
        tools: ToolRunner,
        reply: ReplySettings,
        budgets: BudgetSettings,
        classifier: LlmClassify | None = None,
        knowledge: KnowledgeSearch | None = None,
    ) -> None:
        self.runner = runner
        self.knowledge = knowledge  # the shop's documents (None: answers without them)
        self.router = router
        self.tools = tools
        self.settings = reply
        self.budget_settings = budgets
        self.budgets = Budgets(budgets)
        self.classifier = classifier
        self.specialists = [
            Specialist(s, runner, tools, reply.history_token_budget, reply.max_output_tokens)
            for s in specialists
        ]
        self._by_intent: dict[str, list[Specialist]] = {}
        for sp in self.specialists:
            for intent in sp.settings.intents:
                self._by_intent.setdefault(intent, []).append(sp)

    # -- entry point -------------------------------------------------------------------------

    async def reply(
        self,
        conversation: ConversationInfo,
        history: Sequence[Turn],
        message: Turn,
        visibility: Visibility | None = None,
    ) -> AsyncIterator[ReplyEvent]:
        """The turn's events. `visibility` (kept by the consumer) says whether streamed text
        reached the shopper; without it every delta counts as seen the moment it is sent."""
        queue: asyncio.Queue[ReplyEvent | None] = asyncio.Queue()

        def emit(ev: ReplyEvent) -> None:
            if isinstance(ev, CallRecord):
                self.budgets.add(ev.cost, anonymous=conversation.shop_user_id is None)
            queue.put_nowait(ev)

        async def turn() -> None:
            try:
                await self._turn(conversation, history, message, emit, visibility)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(turn())
        final_seen = False
        try:
            while (ev := await queue.get()) is not None:
                final_seen = final_seen or isinstance(ev, Final)
                yield ev
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("turn_failed", error=repr(task.exception()))
            if not final_seen:
                yield Final(text=self._fallback(message.text), degraded=True)
                yield Escalate("internal_error", "the turn failed")

    # -- one turn ----------------------------------------------------------------------------

    def handoff_text(self, question: str, now: datetime | None = None) -> str:
        """What the shopper is told when a person is asked for: they are coming, or (outside
        business hours) when they will be back."""
        s = self.settings
        hours = s.business_hours
        if hours is not None and not hours.open_at(now or datetime.now(UTC)):
            return pick(question, s.away_notice, s.away_notice_zh)
        return pick(question, s.handoff_notice, s.handoff_notice_zh)

    def _open_now(self) -> bool:
        hours = self.settings.business_hours
        return hours is None or hours.open_at(datetime.now(UTC))

    def _conflict(self, chosen: Sequence[Specialist]) -> bool:
        names = {sp.name for sp in chosen}
        return any(len(names & set(group)) > 1 for group in self.settings.conflicting_specialists)

    def _fallback(self, question: str) -> str:
        return pick(question, self.settings.fallback_text, self.settings.fallback_text_zh)

    async def _turn(
        self,
        conv: ConversationInfo,
        history: Sequence[Turn],
        message: Turn,
        emit: _Emit,
        visibility: Visibility | None = None,
    ) -> None:
        started = time.monotonic()
        deadline = started + self.settings.turn_deadline_seconds
        budget = self.budgets.state(conv.spent, anonymous=conv.shop_user_id is None)
        if budget is BudgetState.EXHAUSTED:
            b = self.budget_settings
            text = pick(message.text, b.exhausted_text, b.exhausted_text_zh)
            if not self._open_now():
                text = self.handoff_text(message.text)  # "a person will take over" is untrue
            emit(Delta(text))
            emit(Final(text=text, degraded=True, routing={"budget": budget.value}))
            emit(Escalate("budget", "the conversation's or the day's model budget is spent"))
            return

        llm = self.classifier if budget is BudgetState.OK else None
        decision, records = await self.router.route(message.text, sticky_tier=conv.tier, llm=llm)
        for r in records:
            emit(r)
        tier = "cheap" if budget is BudgetState.DEGRADE else decision.tier
        routing: dict[str, Any] = {**decision.as_json(), "tier": tier, "budget": budget.value}

        if decision.faq_answer:
            # Answered from the FAQ: no model call at all.
            emit(Delta(decision.faq_answer))
            emit(Final(text=decision.faq_answer, tier=None, routing=routing))
            if decision.escalate:
                emit(self._escalation("router", decision, message.text))
            return

        chosen = self._select(decision, drafting=conv.drafting)
        asks_for_person = "human" in decision.intents or any(s.settings.escalates for s in chosen)
        if not conv.drafting and asks_for_person:
            # A person is asked for: the shopper is told so, in their language, with no
            # model answer standing in for the person. (Upset shoppers who did not ask get
            # their answer, then the same text: see below.)
            text = self.handoff_text(message.text)
            emit(Delta(text))
            emit(Final(text=text, tier=None, routing={**routing, "handoff": True}))
            emit(
                self._escalation(
                    "router" if decision.escalate else "specialist", decision, message.text
                )
            )
            return
        knowledge = await self._knowledge(conv, chosen, message.text)
        turn = TurnInput(
            message.text,
            history,
            decision.intents,
            conv.shop_user_id,
            force_tier="cheap" if budget is BudgetState.DEGRADE else None,
            knowledge=knowledge,
        )
        routing["specialists"] = [s.name for s in chosen]

        out = _Answer(emit, visibility)
        if len(chosen) == 1:
            results = [await self._single(chosen[0], turn, tier, deadline, out, fill=False)]
        elif self._conflict(chosen):
            results = await self._fan_out(chosen, turn, tier, deadline, emit)
            await self._aggregate(results, turn, tier, deadline, out)
        else:
            results = await self._joined(chosen, turn, tier, deadline, out)

        if knowledge is not None:
            routing["knowledge"] = _cite(knowledge, out, message.text)
        degraded = not any(r.ok for r in results)
        escalate: Escalate | None = None
        why = None
        if degraded and time.monotonic() >= deadline:
            why = "deadline"
        elif degraded and conv.degraded_answers + 1 >= 2:
            why = "fallback_twice"
        elif out.broken:
            why = "answer_cut"  # part of an answer was seen and nothing could finish it
        elif decision.escalate and not conv.drafting:
            # Upset without asking for a person: the answer stands and a person is coming.
            if not out.shown:
                out.add(results[0].text)
            escalate = self._escalation("router", decision, message.text)
            out.add(self.handoff_text(message.text), separate=True)
            routing["handoff"] = True
        if why is not None:
            # No clean answer: the shopper is told a person is coming (the handoff text
            # alone when nothing was seen; after what was seen when something was).
            escalate = self._escalation(why, decision, message.text)
            notice = self.handoff_text(message.text)
            if out.shown and out.withdraw():
                out.text = ""
            out.add(notice, separate=True)
            routing["handoff"] = True
        elif not out.shown:
            out.add(results[0].text)  # the degraded text (only a single specialist's is held)
        text = out.text
        best = next((r for r in sorted(results, key=lambda r: -r.priority) if r.ok), None)
        routing["degraded"] = degraded
        routing["specialist_results"] = {
            r.name: {"ok": r.ok, "ms": round(r.elapsed_s * 1000, 1), "tools": r.tools_used}
            for r in results
        }
        emit(
            Final(
                text=text,
                provider=best.provider if best else None,
                model=best.model if best else None,
                tier=tier,
                degraded=degraded,
                routing=routing,
            )
        )
        if escalate is not None:
            emit(escalate)

    async def _knowledge(
        self, conv: ConversationInfo, chosen: Sequence[Specialist], question: str
    ) -> TurnKnowledge | None:
        """The turn's view of the shop's documents, searched once for the message when one of
        its specialists reads them; the collection follows the conversation's channel and
        account (a site's or a brand's own rules)."""
        if self.knowledge is None or not any(
            SEARCH_KNOWLEDGE in sp.settings.tools for sp in chosen
        ):
            return None
        knowledge = self.knowledge
        collection = knowledge.collection_for(conv.channel, conv.account)

        async def search() -> list[Passage]:
            found = await knowledge.search(question, collection=collection)
            if len(chosen) > 1:
                # Several questions in one message: each part is searched too, so each
                # specialist finds what answers its own part.
                parts = question_parts(question)
                each = [await knowledge.search(p, collection=collection) for p in parts]
                found = merge_found([found, *each], limit=max(len(found), MAX_MERGED))
            return found

        found: list[Passage] = []
        try:
            found = await asyncio.wait_for(search(), KNOWLEDGE_WAIT_SECONDS)
        except TimeoutError:
            log.warning("knowledge_search_slow", collection=collection)
        except Exception:
            # Answered as if nothing were found: "I'll check", never a guessed policy.
            log.exception("knowledge_search_failed", collection=collection)
        s = self.settings
        return TurnKnowledge(
            self.knowledge,
            collection,
            pick(question, s.no_knowledge_text, s.no_knowledge_text_zh),
            found,
        )

    def _select(self, decision: RoutingDecision, drafting: bool = False) -> list[Specialist]:
        chosen: list[Specialist] = []
        for intent in decision.intents:
            for sp in self._by_intent.get(intent, []):
                if sp not in chosen and not (drafting and sp.settings.escalates):
                    chosen.append(sp)
        if not chosen:
            chosen = self._by_intent.get("other", [])[:1] or self.specialists[:1]
        return chosen

    async def _single(
        self,
        sp: Specialist,
        turn: TurnInput,
        tier: str,
        deadline: float,
        out: _Answer,
        *,
        fill: bool = True,
    ) -> SpecialistResult:
        """One specialist: its answer streams straight to the shopper. Where it fails before
        any text, its degraded text stands in (with `fill`; else the caller decides)."""
        res = await sp.run(turn, tier, deadline, out.record, on_delta=out.add, seen=out.seen)
        if res.ok or not out.shown:
            if fill and not out.shown:
                out.add(res.text)
            return res
        out.broken = True  # cut mid-answer and nothing could continue it
        return res

    async def _joined(
        self,
        chosen: Sequence[Specialist],
        turn: TurnInput,
        tier: str,
        deadline: float,
        out: _Answer,
    ) -> list[SpecialistResult]:
        """Specialists that answer different parts of the message, in parallel, joined
        without a model (nothing to reconcile): the first of them to write streams at once,
        the others follow in the message's order; the answer is whole when the slowest is."""
        started = time.monotonic()
        live: Specialist | None = None  # the one whose text streams
        held: dict[Specialist, str] = {sp: "" for sp in chosen}

        def on_delta(sp: Specialist) -> Callable[[str], None]:
            def take(delta: str) -> None:
                nonlocal live
                if live is None:
                    live = sp
                if live is sp:
                    out.add(delta)
                else:
                    held[sp] += delta

            return take

        def seen(sp: Specialist) -> Callable[[str], bool]:
            def ask(text: str) -> bool:
                if live is sp:
                    return out.seen(text)
                held[sp] = ""  # nobody saw it: the attempt is dropped
                return False

            return ask

        tasks = {
            sp: asyncio.create_task(
                sp.run(turn, tier, deadline, out.record, on_delta=on_delta(sp), seen=seen(sp))
            )
            for sp in chosen
        }
        try:
            await asyncio.wait(tasks.values(), timeout=max(deadline - time.monotonic(), 0))
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        results: dict[Specialist, SpecialistResult] = {}
        for sp, task in tasks.items():
            done = task.done() and not task.cancelled() and task.exception() is None
            results[sp] = task.result() if done else sp.degraded(turn, time.monotonic() - started)
        written: list[str] = []
        if live is not None and out.shown:
            written.append(out.text)
            if not results[live].ok:
                out.broken = True  # cut mid-answer and nothing could continue it
        for sp in chosen:
            text = results[sp].text
            if (sp is live and out.shown) or any(_same(text, w) for w in written):
                continue  # (agreeing specialists: said once)
            written.append(text)
            out.add(text, separate=True)
        return [results[sp] for sp in chosen]

    async def _fan_out(
        self,
        chosen: Sequence[Specialist],
        turn: TurnInput,
        tier: str,
        deadline: float,
        emit: _Emit,
    ) -> list[SpecialistResult]:
        """Specialists in parallel; whoever hasn't finished when it is time to compose the
        answer is replaced by its degraded text."""
        compose_by = deadline - self.settings.aggregation_reserve_seconds
        started = time.monotonic()
        tasks = {sp: asyncio.create_task(sp.run(turn, tier, compose_by, emit)) for sp in chosen}
        await asyncio.wait(tasks.values(), timeout=max(compose_by - time.monotonic(), 0))
        results: list[SpecialistResult] = []
        for sp, task in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                results.append(task.result())
            else:
                task.cancel()
                results.append(sp.degraded(turn, time.monotonic() - started))
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return results

    async def _aggregate(
        self,
        results: Sequence[SpecialistResult],
        turn: TurnInput,
        tier: str,
        deadline: float,
        out: _Answer,
    ) -> None:
        """One answer from findings that may contradict each other, written by a model."""
        ordered = sorted(results, key=lambda r: -r.priority)
        plain = "\n\n".join(_distinct(r.text for r in ordered))
        if not any(r.ok for r in ordered):
            out.add(plain)
            return
        findings = "\n\n".join(
            f"[{r.name}{'' if r.ok else ', unavailable'}]\n{r.text}" for r in ordered
        )
        messages = [
            ChatMessage("system", AGGREGATE_PROMPT),
            ChatMessage("user", f"Shopper's message:\n{turn.question}\n\nFindings:\n{findings}"),
        ]
        spec = CallSpec(
            messages,
            self.settings.max_output_tokens,
            purpose="aggregate",
            intent=turn.intents[0] if turn.intents else None,
        )
        call = self.runner.call(
            tier,
            spec,
            deadline,
            out.record,
            attempt_timeout=self.settings.aggregation_attempt_seconds,
            seen=out.seen,
        )
        async for delta in call.deltas():
            out.add(delta)
        if call.result.failed:
            # No model could compose: the findings themselves, most authoritative first.
            if out.shown and not out.withdraw():
                out.broken = True
                return
            out.text = ""
            out.add(plain)

    def _escalation(self, reason: str, decision: RoutingDecision, text: str) -> Escalate:
        orders = sorted(set(_ORDER_ID.findall(text)))
        card = {
            "summary": handoff_summary(reason, decision, text, orders),
            "intents": list(decision.intents),
            "sentiment": decision.sentiment,
            "order_ids": orders,
            "routing_stage": decision.stage,
        }
        return Escalate(reason, f"escalated by {reason}", card)


_WHY = {
    "router": "asked for a person or is upset",
    "specialist": "the specialist called for a person",
    "fallback_twice": "the bot could not answer twice in a row",
    "deadline": "no answer within the turn's deadline",
    "answer_cut": "an answer was cut and could not be finished",
    "budget": "the model budget is spent",
    "internal_error": "the bot failed",
}


def handoff_summary(
    reason: str, decision: RoutingDecision, text: str, orders: Sequence[str]
) -> str:
    """The handoff card's summary, without a model: why, about what, and the words."""
    parts = [f"Handed over: {_WHY.get(reason, reason)}."]
    topics = [i for i in decision.intents if i not in ("human", "other")]
    if topics:
        parts.append(f"About: {', '.join(topics)}.")
    if orders:
        parts.append(f"Orders: {', '.join(orders)}.")
    if decision.sentiment and decision.sentiment != "neutral":
        parts.append(f"Mood: {decision.sentiment}.")
    quoted = text.strip()
    parts.append(f"Said: “{quoted[:200]}{'…' if len(quoted) > 200 else ''}”")
    return " ".join(parts)


class _Answer:
    """The text of one answer as it goes out: every delta emitted once, and withdrawn only
    while the shopper has seen none of it (`Visibility`)."""

    def __init__(self, emit: _Emit, visibility: Visibility | None) -> None:
        self.record = emit
        self.visibility = visibility
        self.text = ""
        self.broken = False  # a cut answer nobody could finish

    @property
    def shown(self) -> bool:
        return bool(self.text)

    def add(self, delta: str, *, separate: bool = False) -> None:
        if separate and self.text:
            delta = "\n\n" + delta
        if delta:
            self.text += delta
            self.record(Delta(delta))

    def withdraw(self) -> bool:
        """Take back everything sent so far; False if the shopper may have seen it."""
        if not self.text:
            return True
        if self.visibility is None or not self.visibility.withdraw():
            return False
        self.text = ""
        self.record(Retract())
        return True

    def seen(self, _attempt_text: str) -> bool:
        """For ModelRunner.call: a failed attempt's text stays (and is continued) only if
        the shopper may have seen it."""
        return not self.withdraw()


def _cite(knowledge: TurnKnowledge, out: _Answer, question: str) -> dict[str, Any]:
    """Append the source line when the answer cites passages it was given (a delta of its
    own, so every channel shows it); what was found and cited, for the routing record."""
    line = knowledge.source_line(out.text, question) if out.shown else None
    if line is not None:
        out.add("\n" + line)
    cited = knowledge.sources.cited(out.text) if line is not None else []
    return {
        "collection": knowledge.collection,
        "found": [p.chunk_id for p in knowledge.found],
        "cited": [{"n": n, "chunk_id": p.chunk_id, "source": p.source} for n, p in cited],
    }


def _same(a: str, b: str) -> bool:
    a, b = " ".join(a.split()), " ".join(b.split())
    return a == b or (bool(a) and a in b)


def _distinct(texts: Iterable[str]) -> list[str]:
    kept: list[str] = []
    for t in texts:
        if not any(_same(t, k) for k in kept):
            kept.append(t)
    return kept
