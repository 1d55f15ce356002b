"""The orchestration entry point: `Orchestrator.reply` turns a shopper's message into a stream
of reply events (DESIGN.md, Data flow step 5, Orchestration).

A turn: route the message (rules and FAQ first, a local classifier next, a paid classification
only when unclear, while the local guess's specialists already answer, held:
orchestration/speculation.py); check the budgets; run the specialists of the message's
intents in parallel under one deadline; stream a single specialist's answer directly; join
the answers of several as they finish, whichever writes first streaming at once
(orchestration/parts.py), with a model writing a part only where specialists really
contradict each other on money; escalate when asked to. It never raises to the caller: a
failure becomes a fallback model, a degraded text, then an escalation — and a turn ending in
a handoff says so with the handoff text.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from knowledge.base import KnowledgeSearch, Passage
from orchestration.answer_text import AnswerText
from orchestration.budgets import Budgets, BudgetState
from orchestration.config import BudgetSettings, ReplySettings, SpecialistSettings
from orchestration.events import (
    CallRecord,
    ConversationInfo,
    Delta,
    Escalate,
    Final,
    ReplyEvent,
    Turn,
    Visibility,
)
from orchestration.language import pick
from orchestration.llm.types import ChatMessage
from orchestration.parts import PartsJoin, run_deadlines
from orchestration.routing import LlmClassify, Router, RoutingDecision
from orchestration.runner import CallSpec, ModelRunner
from orchestration.shop_knowledge import (
    SEARCH_KNOWLEDGE,
    TurnKnowledge,
    merge_found,
    question_parts,
)
from orchestration.specialists import Specialist, SpecialistResult, TurnInput
from orchestration.speculation import HeldRun, Speculation
from orchestration.tools import ToolRunner

log = structlog.get_logger(__name__)

AGGREGATE_PROMPT = (
    "You are the shop's customer-service assistant. The shopper has already been sent the "
    "start of the reply; colleagues' further findings follow it. Write only the rest of the "
    "reply, short and in the shopper's language: what the findings add, made to agree with "
    "what was already sent (on prices and discounts, what was sent is right). Do not "
    "repeat anything already sent and do not greet."
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
        guessed: list[Speculation] = []

        def unsure(local: RoutingDecision) -> None:
            # The paid classification is about to be asked: the guess's specialists start.
            spec = self._speculate(conv, history, message, local, deadline)
            if spec is not None:
                guessed.append(spec)

        on_unsure = unsure if llm is not None and self._may_speculate(conv) else None
        try:
            decision, records = await self.router.route(
                message.text, sticky_tier=conv.tier, llm=llm, on_unsure=on_unsure
            )
            for r in records:
                emit(r)
            spec = guessed[0] if guessed else None
            await self._answer(
                conv, history, message, emit, visibility, decision, budget, deadline, spec
            )
        finally:
            # (a turn stopped early, e.g. a person took over, stops the guess's calls too)
            for spec in guessed:
                await spec.close(emit)

    async def _answer(
        self,
        conv: ConversationInfo,
        history: Sequence[Turn],
        message: Turn,
        emit: _Emit,
        visibility: Visibility | None,
        decision: RoutingDecision,
        budget: BudgetState,
        deadline: float,
        spec: Speculation | None,
    ) -> None:
        """The routed turn: a handoff, the FAQ's answer, or the specialists' answer."""
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
            # their answer, then the same text: see below.) Nothing a guess wrote shows.
            if spec is not None:
                routing["speculated"] = await self._settle_guess(spec, {}, emit)
            text = self.handoff_text(message.text)
            emit(Delta(text))
            emit(Final(text=text, tier=None, routing={**routing, "handoff": True}))
            emit(
                self._escalation(
                    "router" if decision.escalate else "specialist", decision, message.text
                )
            )
            return
        if spec is not None:
            await spec.ready()
        if spec is not None and spec.searched == self._knowledge_key(chosen):
            knowledge = spec.knowledge  # (the same search: its passage numbers stay valid)
        else:
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

        held: dict[Specialist, HeldRun] = {}
        if spec is not None:
            deadlines = self._deadlines(chosen, deadline)
            for sp in chosen:
                if (run := spec.take(sp, turn, tier, deadlines[sp])) is not None:
                    held[sp] = run
            routing["speculated"] = await self._settle_guess(spec, held, emit)

        out = AnswerText(emit, visibility)
        if len(chosen) == 1:
            results = [
                await self._single(
                    chosen[0], turn, tier, deadline, out, fill=False, held=held.get(chosen[0])
                )
            ]
        else:
            results = await self._joined(chosen, turn, tier, deadline, out, held)

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

    def _knowledge_key(self, chosen: Sequence[Specialist]) -> tuple[bool, bool]:
        """What `_knowledge` searches for these specialists: whether any reads the shop's
        documents, and whether the message's parts are searched one by one too."""
        reads = self.knowledge is not None and any(
            SEARCH_KNOWLEDGE in sp.settings.tools for sp in chosen
        )
        return reads, reads and len(chosen) > 1

    def _deadlines(self, chosen: Sequence[Specialist], deadline: float) -> dict[Specialist, float]:
        s = self.settings
        return run_deadlines(
            chosen, s.conflicting_specialists, deadline, s.aggregation_reserve_seconds
        )

    # -- starting on the router's guess (orchestration/speculation.py) -------------------------

    def _may_speculate(self, conv: ConversationInfo) -> bool:
        if not self.settings.speculate:
            return False
        # Near the end of a budget a wrong guess, paid for twice, is not worth the time.
        used = self.budgets.used_share(conv.spent, anonymous=conv.shop_user_id is None)
        return used < self.budget_settings.speculate_below

    def _speculate(
        self,
        conv: ConversationInfo,
        history: Sequence[Turn],
        message: Turn,
        guess: RoutingDecision,
        deadline: float,
    ) -> Speculation | None:
        """Start the guess's specialists, held, while the classification runs; None where
        the guess is a handoff (no specialist would answer). A specialist whose tools can
        change something in the shop (file a refund) waits for the classification: a held
        run is not shown, but its tool calls would take effect."""
        selected = self._select(guess, drafting=conv.drafting)
        if guess.faq_answer or (
            not conv.drafting
            and ("human" in guess.intents or any(sp.settings.escalates for sp in selected))
        ):
            return None
        chosen = [sp for sp in selected if self.tools.read_only(sp.settings.tools)]
        if not chosen:
            return None
        spec = Speculation(guess, chosen)

        async def start() -> None:
            knowledge = await self._knowledge(conv, chosen, message.text)
            spec.knowledge, spec.searched = knowledge, self._knowledge_key(chosen)
            turn = TurnInput(
                message.text, history, guess.intents, conv.shop_user_id, knowledge=knowledge
            )
            deadlines = self._deadlines(chosen, deadline)
            for sp in chosen:
                spec.runs[sp] = HeldRun(sp, turn, guess.tier, deadlines[sp])

        spec.starting = asyncio.create_task(start())
        return spec

    @staticmethod
    async def _settle_guess(
        spec: Speculation, kept: dict[Specialist, HeldRun], emit: _Emit
    ) -> dict[str, Any]:
        """Drop the guess's runs the turn does not keep; what happened, for the routing
        record."""
        dropped = await spec.drop_rest(emit)
        if dropped:
            log.info("speculation_dropped", guess=spec.names, dropped=dropped)
        return {"guess": spec.names, "kept": [sp.name for sp in kept], "dropped": dropped}

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
        out: AnswerText,
        *,
        fill: bool = True,
        held: HeldRun | None = None,
    ) -> SpecialistResult:
        """One specialist: its answer streams straight to the shopper (`held`: its run on the
        routing guess, kept, goes on). Where it fails before any text, its degraded text
        stands in (with `fill`; else the caller decides)."""
        if held is not None:
            intent = turn.intents[0] if turn.intents else None
            res = await held.attach(out.add, out.record, out.seen, intent)
        else:
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
        out: AnswerText,
        held: dict[Specialist, HeldRun],
    ) -> list[SpecialistResult]:
        """Specialists answering the parts of one message, in parallel: the first to write
        streams at once, the others follow whole as they finish (orchestration/parts.py)."""

        async def compose(found: Sequence[SpecialistResult], sent: str) -> str | None:
            return await self._compose(found, sent, turn, tier, deadline, out)

        join = PartsJoin(chosen, self.settings.conflicting_specialists, out, compose)
        # Where a model may have to reconcile money, its specialists leave it time.
        return await join.run(turn, tier, deadline, self._deadlines(chosen, deadline), held)

    async def _compose(
        self,
        found: Sequence[SpecialistResult],
        sent: str,
        turn: TurnInput,
        tier: str,
        deadline: float,
        out: AnswerText,
    ) -> str | None:
        """The part of specialists whose money figures may contradict what was already sent,
        written by a model to agree with it; None when no model could write it. Nothing of
        it is shown before it is whole, so a failed attempt is simply dropped."""
        findings = "\n\n".join(f"[{r.name}]\n{r.text}" for r in found)
        messages = [
            ChatMessage("system", AGGREGATE_PROMPT),
            ChatMessage(
                "user",
                f"Shopper's message:\n{turn.question}\n\nAlready sent:\n{sent}\n\n"
                f"Findings:\n{findings}",
            ),
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
        )
        async for _ in call.deltas():
            pass  # (the text of the attempt that succeeded is the result's)
        return None if call.result.failed or not call.result.text.strip() else call.result.text

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


def _cite(knowledge: TurnKnowledge, out: AnswerText, question: str) -> dict[str, Any]:
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
