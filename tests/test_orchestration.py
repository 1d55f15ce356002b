"""Orchestration through the HTTP API and the simulator: routing, specialists in parallel
with tools, deadlines, fallback, hedging, breakers, budgets, the cost ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.costs import report, table
from bot.settings import Settings
from simulator.config import SimulatorConfig
from simulator.server import Simulator
from storage.models import Conversation, HandoffEvent, LLMCall, Message
from tests.demo_tools import DEMO_SHOPPER
from tests.support import RunningService, sse_events, start_service


async def ask(
    svc: RunningService,
    text: str,
    contact: str = "sam",
    conversation_id: int | None = None,
    shop_user_id: str | None = DEMO_SHOPPER,
) -> tuple[int, int, str, dict[str, Any]]:
    """Post a message and read its streamed answer; (conversation, message, deltas, final).
    The caller vouches for `shop_user_id` (the demo orders' owner by default; None: anonymous).

    In a known conversation the stream is opened before posting, so even an instant answer
    (a template) is seen delta by delta."""
    body: dict[str, Any] = {"contact_id": contact, "text": text}
    if shop_user_id is not None:
        body["shop_user_id"] = shop_user_id
    if conversation_id is None:
        r = await svc.post(**body)
        assert r.status_code == 202, r.text
        cid, mid, seq = r.json()["conversation_id"], r.json()["message_id"], r.json()["seq"]
        return cid, mid, *(await _read_answer(svc, cid, seq, lambda: mid))
    body["conversation_id"] = conversation_id
    msgs = await svc.messages(conversation_id)
    posted: dict[str, int] = {}

    async def post() -> None:
        r = await svc.post(**body)
        assert r.status_code == 202, r.text
        posted["mid"] = r.json()["message_id"]

    reader = asyncio.create_task(
        _read_answer(svc, conversation_id, msgs[-1]["seq"], lambda: posted.get("mid"), post)
    )
    shown, final = await reader
    return conversation_id, posted["mid"], shown, final


async def _read_answer(
    svc: RunningService,
    cid: int,
    after: int,
    mid: Callable[[], int | None],
    on_open: Callable[[], Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    shown = ""
    url = f"/api/v1/conversations/{cid}/stream"
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": after}) as s:
        if on_open is not None:
            await on_open()
        async for ev in sse_events(s):
            if ev.event == "delta":
                shown += ev.data["text"]
            elif ev.event == "final" and ev.data["reply_to_id"] == mid():
                return shown, ev.data
    raise AssertionError("no final answer")


async def calls_for(svc: RunningService, message_id: int) -> list[LLMCall]:
    async with svc.services.sessions() as s:
        q = select(LLMCall).where(LLMCall.message_id == message_id).order_by(LLMCall.id)
        return list((await s.execute(q)).scalars())


async def inbound(svc: RunningService, message_id: int) -> Message:
    async with svc.services.sessions() as s:
        m = await s.get(Message, message_id)
        assert m is not None
        return m


@pytest.fixture
def svc(unhedged_service: RunningService) -> RunningService:
    return unhedged_service


async def test_where_is_my_order_is_answered_from_the_shop_backend(svc: RunningService) -> None:
    _, mid, shown, final = await asyncio.wait_for(ask(svc, "where is my order ORD-1001?"), 30)
    assert shown == final["text"]
    calls = await calls_for(svc, mid)
    # (Not the routing's classification, nor a guess started beside it and dropped.)
    replies = [c for c in calls if c.purpose not in ("classify", "speculative")]
    # Either order specialist may take it; both look the order up before answering.
    assert len({c.specialist for c in replies}) == 1
    assert replies[0].specialist in ("logistics", "order_status")
    assert [c.purpose for c in replies] == ["reply", "tool_followup"]
    # The answer quotes the demo backend's own data for that order.
    order = (
        await svc.client.get("/demo-shop/api/orders/ORD-1001?shop_user_id=demo-shopper")
    ).json()
    assert order["tracking_number"] in final["text"] or order["courier"] in final["text"]
    routing = (await inbound(svc, mid)).routing
    assert routing is not None
    assert routing["specialist_results"][replies[0].specialist]["tools"] == ["get_order"]


async def test_faq_is_answered_without_any_model_call(svc: RunningService) -> None:
    cid, _, _, _ = await asyncio.wait_for(ask(svc, "hello!"), 30)
    question = _a_faq_question(svc.services.settings.routing)
    _, mid, shown, final = await asyncio.wait_for(ask(svc, question, conversation_id=cid), 30)
    assert shown == final["text"] and final["text"]
    assert await calls_for(svc, mid) == []
    routing = (await inbound(svc, mid)).routing
    assert routing is not None and routing["stage"] == "faq"


def _a_faq_question(routing: Any) -> str:
    entry = routing.resolved().faq[0]
    return str(entry.questions[0])


async def test_several_intents_run_their_specialists_in_parallel(
    svc: RunningService, simulator: Simulator
) -> None:
    simulator.config.first_token_ms = 300  # long enough for the calls to overlap
    _, mid, shown, final = await asyncio.wait_for(
        ask(svc, "Where is my parcel ORD-1002? Also is coupon DOUBLE11 still valid?"), 30
    )
    assert shown == final["text"]
    calls = await calls_for(svc, mid)
    specialists = {c.specialist for c in calls if c.purpose in ("reply", "tool_followup")}
    assert {"logistics", "discount"} <= specialists
    # Parts that cannot contradict each other are joined as written: no composing call.
    assert not any(c.purpose == "aggregate" for c in calls)
    assert len(final["text"].split("\n\n")) == 2, "both parts, each once"
    assert simulator.stats.peak_active >= 2, "the specialists' model calls overlapped"


async def test_a_hanging_specialist_is_replaced_by_its_degraded_text(
    tmp_path: Path, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    hanging = Simulator(SimulatorConfig(hang_rate=1.0))
    await hanging.start()
    try:
        settings = settings_factory(
            f"sqlite+aiosqlite:///{tmp_path / 'h.db'}",
            resilience={"hedge_after_seconds": None},
            reply={"turn_deadline_seconds": 6, "aggregation_reserve_seconds": 2},
        )
        settings.providers.append(
            settings.providers[0].model_copy(update={"name": "stuck", "base_url": hanging.base_url})
        )
        settings.tiers["stuck"] = ["stuck/sim-a"]
        discount = next(s for s in settings.specialists if s.name == "discount")
        discount.tier = "stuck"
        discount.timeout_seconds = 1.0
        svc = await start_service(settings)
        try:
            _, mid, shown, final = await asyncio.wait_for(
                ask(svc, "Where is my parcel ORD-1002? Also is coupon DOUBLE11 still valid?"), 30
            )
        finally:
            await svc.stop()
    finally:
        await hanging.stop()
    assert shown == final["text"] and final["text"]
    outcomes = {(c.specialist, c.outcome) for c in await _calls(settings, mid)}
    assert ("discount", "timeout") in outcomes
    assert ("logistics", "ok") in outcomes
    routing = await _routing(settings, mid)
    assert routing["specialist_results"]["discount"]["ok"] is False
    assert routing["specialist_results"]["logistics"]["ok"] is True
    assert routing["degraded"] is False


async def _routing(settings: Settings, message_id: int) -> dict[str, Any]:
    from storage.db import create_engine, session_factory

    engine = create_engine(settings.database.url)
    try:
        async with session_factory(engine)() as s:
            m = await s.get(Message, message_id)
            assert m is not None and m.routing is not None
            return dict(m.routing)
    finally:
        await engine.dispose()


async def _calls(settings: Settings, message_id: int) -> list[LLMCall]:
    from storage.db import create_engine, session_factory

    engine = create_engine(settings.database.url)
    try:
        async with session_factory(engine)() as s:
            q = select(LLMCall).where(LLMCall.message_id == message_id).order_by(LLMCall.id)
            return list((await s.execute(q)).scalars())
    finally:
        await engine.dispose()


async def test_retry_after_is_honoured_for_later_messages(
    svc: RunningService, simulator: Simulator
) -> None:
    simulator.queue_fault("429", retry_after=60)
    _, mid1, _, _ = await asyncio.wait_for(ask(svc, "hello there"), 30)
    first = [(c.model, c.outcome) for c in await calls_for(svc, mid1) if c.purpose != "classify"]
    assert first == [("sim-a", "rate_limit"), ("sim-b", "ok")]
    # sim-a asked for 60 s of quiet: the next message goes straight to sim-b.
    _, mid2, _, _ = await asyncio.wait_for(ask(svc, "hi again"), 30)
    second = [(c.model, c.outcome) for c in await calls_for(svc, mid2) if c.purpose != "classify"]
    assert second == [("sim-b", "ok")]


async def test_breaker_opens_on_failures_and_recovers(
    sqlite_url: str, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    settings = settings_factory(
        sqlite_url,
        resilience={
            "hedge_after_seconds": None,
            "retries": 0,
            "breaker_failures": 2,
            "breaker_cooldown_seconds": 3600,
        },
    )
    # sim-b on a simulator of its own, so faults queued for sim-a's simulator hit only sim-a.
    backup = Simulator(SimulatorConfig(first_token_ms=20, tokens_per_second=400, reply_tokens=8))
    await backup.start()
    settings.providers[0].models = settings.providers[0].models[:1]
    settings.providers.append(
        settings.providers[0].model_copy(
            update={
                "name": "backup",
                "base_url": backup.base_url,
                "models": [settings.providers[0].models[0].model_copy(update={"name": "sim-b"})],
            }
        )
    )
    settings.tiers = {"cheap": ["sim/sim-a", "backup/sim-b"], "premium": ["sim/sim-a"]}
    svc = await start_service(settings)
    try:
        simulator.queue_fault("500", count=2)
        for text in ("hi", "hello"):
            await asyncio.wait_for(ask(svc, text), 30)
        guard = svc.services.orchestrator.runner.guards.get("sim/sim-a")
        assert guard.breaker.state == "open"
        # While open, sim-a is not even tried.
        _, mid, _, _ = await asyncio.wait_for(ask(svc, "hey"), 30)
        models = [c.model for c in await calls_for(svc, mid) if c.purpose != "classify"]
        assert models == ["sim-b"]
        # Cooldown over: one probe goes to sim-a; it succeeds and closes the breaker.
        guard.breaker.cooldown_s = 0
        _, mid, _, _ = await asyncio.wait_for(ask(svc, "good day"), 30)
        models = [c.model for c in await calls_for(svc, mid) if c.purpose != "classify"]
        assert models == ["sim-a"]
        assert guard.breaker.state == "closed"
    finally:
        await svc.stop()
        await backup.stop()


async def test_hedging_keeps_the_faster_model_and_bills_both(
    sqlite_url: str, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    svc = await start_service(settings_factory(sqlite_url, resilience={"hedge_after_seconds": 0.3}))
    try:
        simulator.queue_fault("slow", first_token_ms=5000)
        _, mid, shown, final = await asyncio.wait_for(ask(svc, "thanks a lot!"), 30)
        assert shown == final["text"]
        calls = [c for c in await calls_for(svc, mid) if c.purpose != "classify"]
        assert [(c.model, c.outcome) for c in calls] == [("sim-a", "hedge_lost"), ("sim-b", "ok")]
        assert all(c.cost > 0 for c in calls), "both attempts are billed"
    finally:
        await svc.stop()


async def test_spent_budget_degrades_then_hands_off(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> None:
    svc = await start_service(
        settings_factory(
            sqlite_url,
            resilience={"hedge_after_seconds": None},
            budgets={"per_conversation": 1.0, "degrade_at": 1e-9},
        )
    )
    try:
        cid, mid1, _, _ = await asyncio.wait_for(ask(svc, "hello!"), 30)
        assert sum(c.cost for c in await calls_for(svc, mid1)) > 0
        # A refund dispute goes to premium; with the budget past its degrade mark, cheap.
        dispute = "the kettle arrived broken and I want my money back for ORD-1003"
        _, mid2, _, _ = await asyncio.wait_for(ask(svc, dispute, conversation_id=cid), 30)
        r2 = (await inbound(svc, mid2)).routing or {}
        assert (r2["budget"], r2["tier"]) == ("degrade", "cheap")
        assert {c.tier for c in await calls_for(svc, mid2)} == {"cheap"}
        # Spent: a template, no model call, and a person is called.
        svc.services.orchestrator.budgets.settings.per_conversation = 1e-9
        _, mid3, shown, final = await asyncio.wait_for(ask(svc, "hello?", conversation_id=cid), 30)
        assert ((await inbound(svc, mid3)).routing or {})["budget"] == "exhausted"
        assert shown == final["text"] == svc.services.settings.budgets.exhausted_text
        assert await calls_for(svc, mid3) == []
        async with svc.services.sessions() as s:
            conv = await s.get(Conversation, cid)
            reasons = [e.reason for e in (await s.execute(select(HandoffEvent))).scalars()]
        assert conv is not None and conv.owner == "handoff_requested"
        assert reasons == ["budget"]
    finally:
        await svc.stop()


async def test_asking_for_a_person_hands_off_with_a_card(svc: RunningService) -> None:
    cid, _, _, final = await asyncio.wait_for(
        ask(svc, "I want to talk to a real person about ORD-1004 please"), 30
    )
    assert final["text"]
    async with svc.services.sessions() as s:
        conv = await s.get(Conversation, cid)
        events = list((await s.execute(select(HandoffEvent))).scalars())
    assert conv is not None and conv.owner == "handoff_requested"
    card = events[0].card or {}
    assert "human" in card["intents"] and card["order_ids"] == ["ORD-1004"]


async def test_costs_report_groups_the_ledger(svc: RunningService) -> None:
    await asyncio.wait_for(ask(svc, "where is my order ORD-1001?"), 30)
    from bot.costs import parse_when

    rows = await asyncio.to_thread(
        report, svc.services.settings.database.url, parse_when("1h"), None
    )
    assert rows and rows[0].model.startswith("sim/") and rows[0].intent
    text = table(rows)
    assert rows[0].intent in text and "total" in text
