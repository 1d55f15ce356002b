"""A message the local router is unsure of (issue 14): while the paid classification runs,
the specialists of the router's own guess already answer, held; the answer goes out the
moment the classification agrees, and a wrong guess shows nothing and is recorded as waste.

The classification is a fake model that answers only when the test lets it, so "the
specialists ran before the classification ended" is an order of events, not a timing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from bot.settings import Settings
from simulator.fakes.json_model import JsonModel
from simulator.server import Simulator
from storage.models import LLMCall
from tests.demo_tools import DEMO_SHOPPER
from tests.support import RunningService, eventually, sse_events, start_service
from tests.test_agents_console import Console, _agent
from tests.test_answer_integrity import sentences
from tests.test_orchestration import ask, inbound

TWO_PARTS = "Where is my parcel ORD-1002? Also is coupon DOUBLE11 still valid?"
ONE_PART = "Where is my parcel ORD-1002?"


def verdict(*intents: str, needs_human: bool = False) -> str:
    return json.dumps(
        {
            "intents": list(intents),
            "complexity": "complex" if len(intents) > 1 else "simple",
            "sentiment": "neutral",
            "needs_human": needs_human,
        }
    )


class GatedJudge(JsonModel):
    """The classification model: answers `answer`, each request only once `gate` is open."""

    def __init__(self) -> None:
        super().__init__(verdict("greeting"))
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked: list[str] = []  # the messages it was asked to classify, on arrival

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.asked.append((await request.json())["messages"][-1]["content"])
        await self.gate.wait()
        return await super()._completions(request)


@dataclass
class Turn:
    """One question's answer as an SSE client of the conversation saw it."""

    svc: RunningService
    cid: int
    message_id: int = 0
    deltas: list[str] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    calls_before: int = 0  # the simulator's completed calls before the question
    answered: bool = True  # whether a final answer is to be awaited

    async def calls(self) -> list[tuple[str | None, str, str]]:
        async with self.svc.services.sessions() as s:
            q = select(LLMCall).where(LLMCall.message_id == self.message_id).order_by(LLMCall.id)
            rows = (await s.execute(q)).scalars()
            return [(c.specialist, c.purpose, c.outcome) for c in rows]


@asynccontextmanager
async def asking(
    svc: RunningService, judge: GatedJudge, text: str, sim: Simulator, answer: str
) -> AsyncIterator[Turn]:
    """Post `text` with its classification (`answer`) held back; inside, the turn is under
    way and the judge's gate closed. On leaving, the gate opens and the final answer is
    awaited."""
    judge.answer = verdict("greeting")
    cid, _, _, _ = await asyncio.wait_for(ask(svc, "hello!", contact="sam"), 30)
    judge.answer = answer
    seq = (await svc.messages(cid))[-1]["seq"]
    turn = Turn(svc, cid, calls_before=sim.stats.completed)
    judge.gate.clear()
    url = f"/api/v1/conversations/{cid}/stream"
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": seq}) as s:

        async def read() -> None:
            async for ev in sse_events(s):
                if ev.event == "delta":
                    turn.deltas.append(ev.data["text"])
                elif ev.event == "final" and ev.data["reply_to_id"] == turn.message_id:
                    turn.final = ev.data
                    return

        reader = asyncio.create_task(read())
        try:
            r = await svc.post(
                contact_id="sam", text=text, conversation_id=cid, shop_user_id=DEMO_SHOPPER
            )
            assert r.status_code == 202, r.text
            turn.message_id = r.json()["message_id"]
            yield turn
            judge.gate.set()
            if turn.answered:
                await asyncio.wait_for(reader, 30)
        finally:
            judge.gate.set()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@pytest.fixture
async def judge() -> AsyncIterator[GatedJudge]:
    model = GatedJudge()
    await model.start()
    yield model
    await model.stop()


def judged(
    settings_factory: Callable[..., Settings], db: str, judge: GatedJudge, **overrides: Any
) -> Settings:
    """Every message is classified (by the judge, the cheap tier); the specialists answer on
    the premium tier (the simulator)."""
    settings = settings_factory(
        db, resilience={"hedge_after_seconds": None}, routing={"llm_below": 1.0}, **overrides
    )
    settings.providers.append(
        settings.providers[0].model_copy(update={"name": "judge", "base_url": judge.base_url})
    )
    settings.tiers["cheap"] = ["judge/sim-a"]
    for sp in settings.specialists:
        sp.tier = "premium"
    return settings


@pytest.fixture
async def svc(
    sqlite_url: str, settings_factory: Callable[..., Settings], judge: GatedJudge
) -> AsyncIterator[RunningService]:
    s = await start_service(judged(settings_factory, sqlite_url, judge))
    yield s
    await s.stop()


async def finished_calls(sim: Simulator, before: int, n: int) -> None:
    async def done() -> bool:
        return sim.stats.completed - before >= n and sim.stats.active == 0

    await eventually(done)


def guess_of(svc: RunningService, question: str) -> tuple[str, ...]:
    return svc.services.orchestrator.router.route_local(question).intents


@pytest.mark.parametrize(
    ("question", "says"),
    [(TWO_PARTS, ("ORD-1002", "DOUBLE11")), (ONE_PART, ("ORD-1002",))],
    ids=["two-parts", "one-part"],
)
async def test_the_guess_answers_while_the_classification_runs(
    svc: RunningService,
    judge: GatedJudge,
    simulator: Simulator,
    question: str,
    says: tuple[str, ...],
) -> None:
    guess = guess_of(svc, question)
    assert (len(guess) > 1) == (question == TWO_PARTS)
    # The classification agrees with the router's guess.
    async with asking(svc, judge, question, simulator, verdict(*guess)) as turn:
        # Every call of the answer (a tool round and the reply, per specialist) is done
        # while the classification is still out, and none of it has been shown.
        await finished_calls(simulator, turn.calls_before, 2 * len(guess))
        assert judge.asked[-1] == question
        assert turn.deltas == []
        inflight = svc.services.pipeline.hub.inflight(turn.cid)
        assert inflight is None or inflight[1] == []  # (typing, no text)
    text = turn.final["text"]
    assert "".join(turn.deltas) == text
    assert all(s in text for s in says)
    said = sentences(text)
    assert len(said) == len(set(said)), f"a sentence repeated: {text!r}"
    calls = await turn.calls()
    assert calls.count((None, "classify", "ok")) == 1
    # Nothing was asked twice and nothing wasted: the held calls are the answer's.
    assert sorted(c for c in calls if c[1] != "classify") == sorted(
        (sp, purpose, "ok") for sp in guess for purpose in ("reply", "tool_followup")
    )


async def test_a_part_the_classification_drops_is_recorded_as_waste(
    svc: RunningService, judge: GatedJudge, simulator: Simulator
) -> None:
    guess = guess_of(svc, TWO_PARTS)
    assert len(guess) == 3, guess  # the router hears a third part; the classification not
    async with asking(svc, judge, TWO_PARTS, simulator, verdict(*guess[:2])) as turn:
        await finished_calls(simulator, turn.calls_before, 2 * len(guess))
        assert turn.deltas == []
    calls = await turn.calls()
    # The two parts it agrees on went on (each asked once); the third is waste.
    assert sorted(c for c in calls if c[0] in guess[:2]) == sorted(
        (sp, purpose, "ok") for sp in guess[:2] for purpose in ("reply", "tool_followup")
    )
    assert {c[1] for c in calls if c[0] == guess[2]} == {"speculative"}
    assert "".join(turn.deltas) == turn.final["text"]
    assert "ORD-1002" in turn.final["text"] and "DOUBLE11" in turn.final["text"]


async def test_a_wrong_guess_shows_nothing_and_its_calls_are_recorded_as_waste(
    svc: RunningService, judge: GatedJudge, simulator: Simulator
) -> None:
    assert guess_of(svc, ONE_PART) == ("logistics",)
    # The router guesses logistics; the classification says it is about a product.
    async with asking(svc, judge, ONE_PART, simulator, verdict("product")) as turn:
        await finished_calls(simulator, turn.calls_before, 2)
        assert turn.deltas == []
    calls = await turn.calls()
    wasted = [c for c in calls if c[1] == "speculative"]
    assert wasted and {c[0] for c in wasted} == {"logistics"}
    assert ("product", "reply", "ok") in calls
    assert not any(c[0] == "logistics" and c[1] != "speculative" for c in calls)
    text = turn.final["text"]
    assert "".join(turn.deltas) == text
    # The logistics answer (the parcel's courier and tracking number) never showed.
    held = await _logistics_answer(svc, judge, simulator)
    assert not set(sentences(held)) & set(sentences(text)), text


async def _logistics_answer(svc: RunningService, judge: GatedJudge, sim: Simulator) -> str:
    """What the logistics specialist says to ONE_PART when the classification agrees."""
    async with asking(svc, judge, ONE_PART, sim, verdict("logistics")) as turn:
        pass
    return str(turn.final["text"])


async def test_a_handoff_per_the_classification_shows_only_the_handoff_text(
    svc: RunningService, judge: GatedJudge, simulator: Simulator
) -> None:
    async with asking(svc, judge, ONE_PART, simulator, verdict("human", needs_human=True)) as turn:
        await finished_calls(simulator, turn.calls_before, 2)
    notice = svc.services.settings.reply.handoff_notice
    assert turn.deltas == [notice] and turn.final["text"] == notice
    calls = await turn.calls()
    assert {c[1] for c in calls} == {"classify", "speculative"}


@pytest.mark.parametrize(
    ("overrides", "spent_today"),
    [
        ({"reply": {"speculate": False}}, 0.0),
        # Past half of the day's budget (still short of cheap-tier-only at 80%): a guess
        # that may be paid for twice is not made.
        ({"budgets": {"per_day": 10.0}}, 6.0),
    ],
    ids=["turned-off", "budget-past-half"],
)
async def test_no_guess_when_turned_off_or_near_the_end_of_a_budget(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    judge: GatedJudge,
    simulator: Simulator,
    overrides: dict[str, Any],
    spent_today: float,
) -> None:
    settings = judged(settings_factory, sqlite_url, judge, **overrides)
    svc = await start_service(settings)
    svc.services.orchestrator.budgets.add(spent_today)
    try:
        async with asking(svc, judge, ONE_PART, simulator, verdict("logistics")) as turn:
            await eventually(lambda: _asked(judge, ONE_PART))
            assert turn.deltas == []
            # No specialist has been asked anything while the classification is out.
            assert simulator.stats.requests == turn.calls_before
        assert "ORD-1002" in turn.final["text"]
        assert "speculative" not in {c[1] for c in await turn.calls()}
    finally:
        await svc.stop()


async def _asked(judge: GatedJudge, text: str) -> bool:
    return bool(judge.asked) and judge.asked[-1] == text


async def test_a_person_taking_over_stops_the_guess_too(
    svc: RunningService, judge: GatedJudge, simulator: Simulator
) -> None:
    await _agent(svc, "mia")
    mia = Console(svc, "mia")
    try:
        await mia.sign_in()
        # The guess's model streams slowly: it is still writing when Mia takes over.
        slow = ONE_PART + " [[sim:tps=5,tokens=60]]"
        cut = simulator.stats.disconnected
        async with asking(svc, judge, slow, simulator, verdict("logistics")) as turn:

            async def streaming() -> bool:
                return simulator.stats.active > 0

            await eventually(streaming)
            assert (await mia.post(f"/conversations/{turn.cid}/claim")).status_code == 200
            turn.answered = False

        async def stopped() -> bool:
            return simulator.stats.disconnected > cut and simulator.stats.active == 0

        await eventually(stopped)

        async def settled() -> list[dict[str, Any]] | None:
            msgs = await svc.messages(turn.cid)
            answers = [m for m in msgs if m["reply_to_id"] == turn.message_id]
            return answers if answers and answers[0]["status"] != "streaming" else None

        answers = await eventually(settled)
        assert [a["status"] for a in answers] == ["abandoned"]
        assert turn.deltas == []
    finally:
        await mia.close()


async def test_a_guess_that_could_file_a_refund_waits_for_the_classification(
    svc: RunningService, judge: GatedJudge, simulator: Simulator
) -> None:
    """A held run is not shown, but its tool calls would take effect: the refund specialist
    (request_refund posts to the shop) is not started on a guess."""
    question = "I want a refund for ORD-1002, it arrived broken"
    assert guess_of(svc, question) == ("refund",)
    async with asking(svc, judge, question, simulator, verdict("refund")) as turn:
        await eventually(lambda: _asked(judge, question))
    calls = await turn.calls()
    assert ("refund", "reply", "ok") in calls
    assert not any(c[1] == "speculative" for c in calls)
    routing = (await inbound(svc, turn.message_id)).routing
    assert routing is not None and "speculated" not in routing, routing
    assert "".join(turn.deltas) == turn.final["text"]
