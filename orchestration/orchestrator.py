"""The orchestration entry point: `Orchestrator.reply` turns a shopper's message into a stream
of reply events (DESIGN.md, Data flow step 5, Orchestration).

A turn: route the message (rules and FAQ first, a local classifier next, a paid classification
only when unclear); check the budgets; run the specialists of the message's intents in
parallel under one deadline; stream a single specialist's answer directly, or compose one
answer from several (priority decides conflicts); escalate when asked to. It never raises to
the caller: a failure becomes a fallback model, a degraded text, then an escalation.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import structlog

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
)
from orchestration.language import pick
from orchestration.llm.types import ChatMessage
from orchestration.routing import LlmClassify, Router, RoutingDecision
from orchestration.runner import CallSpec, ModelRunner
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
    ) -> None:
        self.runner = runner
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
        self, conversation: ConversationInfo, history: Sequence[Turn], message: Turn
    ) -> AsyncIterator[ReplyEvent]:
        queue: asyncio.Queue[ReplyEvent | None] = asyncio.Queue()

        def emit(ev: ReplyEvent) -> None:
            if isinstance(ev, CallRecord):
                self.budgets.add(ev.cost)
            queue.put_nowait(ev)

        async def turn() -> None:
            try:
                await self._turn(conversation, history, message, emit)
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

    def _fallback(self, question: str) -> str:
        return pick(question, self.settings.fallback_text, self.settings.fallback_text_zh)

    async def _turn(
        self, conv: ConversationInfo, history: Sequence[Turn], message: Turn, emit: _Emit
    ) -> None:
        started = time.monotonic()
        deadline = started + self.settings.turn_deadline_seconds
        budget = self.budgets.state(conv.spent)
        if budget is BudgetState.EXHAUSTED:
            b = self.budget_settings
            text = pick(message.text, b.exhausted_text, b.exhausted_text_zh)
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

        chosen = self._select(decision)
        turn = TurnInput(
            message.text,
            history,
            decision.intents,
            conv.verified,
            force_tier="cheap" if budget is BudgetState.DEGRADE else None,
        )
        routing["specialists"] = [s.name for s in chosen]

        if len(chosen) == 1:
            results = [await self._single(chosen[0], turn, tier, deadline, emit)]
            text = results[0].text
        else:
            results = await self._fan_out(chosen, turn, tier, deadline, emit)
            text = await self._aggregate(results, turn, tier, deadline, emit)

        degraded = not any(r.ok for r in results)
        escalate: Escalate | None = None
        if decision.escalate or any(s.settings.escalates for s in chosen):
            escalate = self._escalation(
                "router" if decision.escalate else "specialist", decision, message.text
            )
        elif degraded and conv.degraded_answers + 1 >= 2:
            escalate = self._escalation("fallback_twice", decision, message.text)
        if escalate is not None and not any(s.settings.escalates for s in chosen):
            notice = pick(
                message.text, self.settings.handoff_notice, self.settings.handoff_notice_zh
            )
            emit(Delta("\n\n" + notice))
            text = f"{text}\n\n{notice}"
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

    def _select(self, decision: RoutingDecision) -> list[Specialist]:
        chosen: list[Specialist] = []
        for intent in decision.intents:
            for sp in self._by_intent.get(intent, []):
                if sp not in chosen:
                    chosen.append(sp)
        if not chosen:
            chosen = self._by_intent.get("other", [])[:1] or self.specialists[:1]
        return chosen

    async def _single(
        self, sp: Specialist, turn: TurnInput, tier: str, deadline: float, emit: _Emit
    ) -> SpecialistResult:
        """One specialist: its answer streams straight to the shopper."""
        shown: list[str] = []

        def stream(delta: str) -> None:
            shown.append(delta)
            emit(Delta(delta))

        res = await sp.run(turn, tier, deadline, emit, on_delta=stream)
        if res.ok:
            return res
        if not shown:
            emit(Delta(res.text))  # nothing reached the shopper: the degraded text is the answer
            return res
        # Cut mid-answer and nothing could continue it: close the answer honestly.
        tail = "\n\n" + self._fallback(turn.question)
        emit(Delta(tail))
        res.text = "".join(shown) + tail
        return res

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
        emit: _Emit,
    ) -> str:
        ordered = sorted(results, key=lambda r: -r.priority)
        plain = "\n\n".join(r.text for r in ordered)
        if not any(r.ok for r in ordered):
            emit(Delta(plain))
            return plain
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
            tier, spec, deadline, emit, attempt_timeout=self.settings.aggregation_attempt_seconds
        )
        shown = ""
        async for delta in call.deltas():
            shown += delta
            emit(Delta(delta))
        if not call.result.failed:
            return shown
        # No model could compose: the findings themselves, most authoritative first.
        rest = plain if not shown else "\n\n" + plain
        emit(Delta(rest))
        return shown + rest

    def _escalation(self, reason: str, decision: RoutingDecision, text: str) -> Escalate:
        card = {
            "summary": text[:500],
            "intents": list(decision.intents),
            "sentiment": decision.sentiment,
            "order_ids": sorted(set(_ORDER_ID.findall(text))),
            "routing_stage": decision.stage,
        }
        return Escalate(reason, f"escalated by {reason}", card)
