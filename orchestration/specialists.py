"""A specialist: a system prompt, a tier, tools, a timeout. Its tool loop runs inside its own
deadline; when it fails or runs out of time its degraded text stands in for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from orchestration.config import SpecialistSettings
from orchestration.events import CallRecord, Turn
from orchestration.language import pick
from orchestration.llm.tokens import trim_history
from orchestration.llm.types import ChatMessage, ToolCall
from orchestration.runner import CallSpec, ModelRunner
from orchestration.shop_knowledge import SEARCH_KNOWLEDGE, TOOL_DEFINITION, TurnKnowledge
from orchestration.tools import ToolRunner

log = structlog.get_logger(__name__)

PART_PROMPT = (
    "\n\nThe shopper's message has several parts and colleagues answer the others. Answer "
    "only the part about: {intents}. Do not greet and do not repeat the question."
)


@dataclass(slots=True)
class SpecialistResult:
    name: str
    priority: int
    text: str
    ok: bool  # False: degraded text (failed or timed out)
    tools_used: list[str] = field(default_factory=list)
    model: str | None = None
    provider: str | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TurnInput:
    """What every specialist of a turn sees."""

    question: str
    history: Sequence[Turn]
    intents: Sequence[str]
    shop_user_id: str | None  # the verified shopper (None: anonymous)
    force_tier: str | None = None  # budgets: overrides every specialist's own tier
    # The shop's documents for this turn (None: no knowledge base, or no specialist of the
    # turn searches it).
    knowledge: TurnKnowledge | None = None


class Specialist:
    def __init__(
        self,
        settings: SpecialistSettings,
        runner: ModelRunner,
        tools: ToolRunner,
        history_budget: int,
        max_tokens: int,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.tools = tools
        self.history_budget = history_budget
        self.max_tokens = max_tokens

    @property
    def name(self) -> str:
        return self.settings.name

    def degraded(self, turn: TurnInput, elapsed: float = 0.0) -> SpecialistResult:
        s = self.settings
        return SpecialistResult(
            s.name,
            s.priority,
            pick(turn.question, s.degraded_text, s.degraded_text_zh),
            ok=False,
            elapsed_s=elapsed,
        )

    def knowledge(self, turn: TurnInput) -> TurnKnowledge | None:
        """The turn's documents, if this specialist reads them (`search_knowledge`)."""
        return turn.knowledge if SEARCH_KNOWLEDGE in self.settings.tools else None

    def _tool_definitions(self, turn: TurnInput) -> list[dict[str, Any]]:
        defs = self.tools.definitions([t for t in self.settings.tools if t != SEARCH_KNOWLEDGE])
        if self.knowledge(turn) is not None:
            defs.append(TOOL_DEFINITION)
        return defs

    async def _call_tool(self, turn: TurnInput, call: ToolCall, timeout_s: float) -> str:
        knowledge = self.knowledge(turn)
        if call.name == SEARCH_KNOWLEDGE and knowledge is not None:
            # Built in: searched here, in the turn's own collection.
            return await knowledge.call(call.arguments)
        return await self.tools.call(
            call.name, call.arguments, timeout_s=timeout_s, shop_user_id=turn.shop_user_id
        )

    def _prompt(self, turn: TurnInput) -> list[ChatMessage]:
        system = self.settings.system_prompt
        knowledge = self.knowledge(turn)
        if knowledge is not None:
            # Found before the first model call: the usual question needs no tool round.
            system += "\n\n" + knowledge.prompt_block()
        mine = [i for i in turn.intents if i in self.settings.intents]
        if len(mine) < len(turn.intents):
            # Colleagues answer the message's other parts: saying one part twice (or
            # another's part worse) is what makes a joined answer repeat itself.
            system += PART_PROMPT.format(intents=", ".join(mine or self.settings.intents))
        msgs = [ChatMessage("system", system)]
        for t in turn.history:
            if t.sender == "agent":
                # The model must know a person said this, not itself.
                msgs.append(ChatMessage("assistant", f"[human agent] {t.text}"))
            else:
                msgs.append(ChatMessage(t.role, t.text))
        msgs.append(ChatMessage("user", turn.question))
        return trim_history(msgs, self.history_budget)

    def opening(
        self, turn: TurnInput, tier: str
    ) -> tuple[str, list[ChatMessage], list[dict[str, Any]]]:
        """The tier, prompt and tools of its first request: two runs that open alike are
        interchangeable (a run started on a routing guess stands for the real one)."""
        tier = turn.force_tier or self.settings.tier or tier
        return tier, self._prompt(turn), self._tool_definitions(turn)

    async def run(
        self,
        turn: TurnInput,
        tier: str,
        deadline: float,
        on_record: Callable[[CallRecord], None],
        on_delta: Callable[[str], None] | None = None,
        seen: Callable[[str], bool] | None = None,
    ) -> SpecialistResult:
        """The specialist's answer. With `on_delta`, its final text streams out as written
        (a turn with one specialist needs no aggregation); `seen` says whether a failed
        attempt's streamed text reached the shopper (see ModelRunner.call)."""
        started = time.monotonic()
        tier = turn.force_tier or self.settings.tier or tier
        messages = self._prompt(turn)
        tool_defs = self._tool_definitions(turn)
        used: list[str] = []
        shown = ""  # every delta of every round, in order: what the shopper may have seen
        try:
            for round_ in range(self.settings.max_tool_rounds + 1):
                offer_tools = bool(tool_defs) and round_ < self.settings.max_tool_rounds
                extra = {"tools": tool_defs, "tool_choice": "auto"} if offer_tools else None
                spec = CallSpec(
                    messages,
                    self.max_tokens,
                    purpose="reply" if round_ == 0 else "tool_followup",
                    specialist=self.name,
                    intent=turn.intents[0] if turn.intents else None,
                    extra=extra,
                )
                # A model that misses the specialist's timeout gives way to the next one of
                # the chain while the turn has time.
                round_start = len(shown)

                def kept(text: str, round_start: int = round_start) -> bool:
                    nonlocal shown
                    if seen is not None and seen(text):
                        return True
                    shown = shown[:round_start]  # withdrawn: the next model starts clean
                    return False

                call = self.runner.call(
                    tier,
                    spec,
                    deadline,
                    on_record,
                    attempt_timeout=self.settings.timeout_seconds,
                    seen=kept,
                )
                async for delta in call.deltas():
                    shown += delta
                    if on_delta is not None:
                        on_delta(delta)
                result = call.result
                if result.failed:
                    if shown:
                        # Cut and nothing could continue it: what was shown stays.
                        return SpecialistResult(
                            self.name,
                            self.settings.priority,
                            shown,
                            ok=False,
                            tools_used=used,
                            elapsed_s=time.monotonic() - started,
                        )
                    return self.degraded(turn, time.monotonic() - started)
                calls = result.stream.stats.tool_calls if result.stream is not None else []
                if not calls:
                    entry = result.entry
                    return SpecialistResult(
                        self.name,
                        self.settings.priority,
                        shown,
                        ok=True,
                        tools_used=used,
                        model=entry.model if entry else None,
                        provider=entry.provider if entry else None,
                        elapsed_s=time.monotonic() - started,
                    )
                messages = [
                    *messages,
                    ChatMessage("assistant", result.text, tool_calls=tuple(calls)),
                ]
                remaining = (
                    min(deadline, started + self.settings.timeout_seconds) - time.monotonic()
                )
                outputs = await asyncio.gather(
                    *(self._call_tool(turn, c, max(remaining, 0.1)) for c in calls)
                )
                for c, out in zip(calls, outputs, strict=True):
                    used.append(c.name)
                    messages.append(ChatMessage("tool", out, tool_call_id=c.id, name=c.name))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("specialist_failed", specialist=self.name)
        return self.degraded(turn, time.monotonic() - started)
