"""A message that asks several things (issue 14), over the HTTP API and its SSE stream: the
part ready first streams at once, the others follow, each once; a model writes a part only
where specialists that may contradict each other both state money."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select

from bot.settings import Settings
from simulator.config import SimulatorConfig
from simulator.server import Simulator
from storage.models import LLMCall
from tests.demo_tools import DEMO_SHOPPER
from tests.support import RunningService, sse_events, start_service
from tests.test_answer_integrity import sentences
from tests.test_orchestration import ask


@pytest.fixture
def svc(unhedged_service: RunningService) -> RunningService:
    return unhedged_service


@dataclass
class Streamed:
    deltas: list[str] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    message_id: int = 0
    # What the slow model had finished when the first delta arrived.
    slow_done_at_first_delta: int | None = None


async def stream_answer(
    svc: RunningService, text: str, slow: Simulator | None = None, contact: str = "sam"
) -> Streamed:
    """Ask in an open conversation with its stream already open, so every delta is seen."""
    cid, _, _, _ = await asyncio.wait_for(ask(svc, "hello!", contact=contact), 30)
    msgs = await svc.messages(cid)
    got = Streamed()
    url = f"/api/v1/conversations/{cid}/stream"
    params = {"after": msgs[-1]["seq"]}
    async with svc.client.stream("GET", url, headers=svc.headers, params=params) as s:
        r = await svc.post(
            contact_id=contact, text=text, conversation_id=cid, shop_user_id=DEMO_SHOPPER
        )
        assert r.status_code == 202, r.text
        got.message_id = r.json()["message_id"]
        async for ev in sse_events(s):
            if ev.event == "delta":
                if not got.deltas and slow is not None:
                    got.slow_done_at_first_delta = slow.stats.completed
                got.deltas.append(ev.data["text"])
            elif ev.event == "final" and ev.data["reply_to_id"] == got.message_id:
                got.final = ev.data
                return got
    raise AssertionError("no final answer")


async def calls_of(svc: RunningService, message_id: int) -> list[tuple[str | None, str]]:
    async with svc.services.sessions() as s:
        q = select(LLMCall).where(LLMCall.message_id == message_id).order_by(LLMCall.id)
        return [(c.specialist, c.purpose) for c in (await s.execute(q)).scalars()]


@pytest.mark.parametrize(
    ("question", "slow_one", "first_says", "then_says"),
    [
        # Parts that cannot contradict each other.
        (
            "Where is my parcel ORD-1002? Also is coupon DOUBLE11 still valid?",
            "discount",
            "ORD-1002",
            "DOUBLE11",
        ),
        # A refund and a coupon may contradict each other on money: the coupon's answer
        # (the pricing specialist's) still goes out without waiting for the refund's.
        (
            "订单ORD-1002的云感缓震跑步鞋有质量问题想退货，顺便问下优惠券SUMMER30还能用吗",
            "refund",
            "SUMMER30",
            "ORD-1002",
        ),
    ],
    ids=["disjoint", "may-conflict"],
)
async def test_the_part_ready_first_streams_before_a_slow_specialist_is_done(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    question: str,
    slow_one: str,
    first_says: str,
    then_says: str,
) -> None:
    """One specialist's model is slow: the other part is on the shopper's screen before it
    has finished, and the slow one's answer follows once, after it."""
    slow = Simulator(SimulatorConfig(first_token_ms=1500, tokens_per_second=400, reply_tokens=12))
    await slow.start()
    try:
        settings = settings_factory(sqlite_url, resilience={"hedge_after_seconds": None})
        settings.providers.append(
            settings.providers[0].model_copy(update={"name": "slow", "base_url": slow.base_url})
        )
        settings.tiers["slow"] = ["slow/sim-a"]
        next(s for s in settings.specialists if s.name == slow_one).tier = "slow"
        svc = await start_service(settings)
        try:
            got = await asyncio.wait_for(stream_answer(svc, question, slow), 30)
            calls = await calls_of(svc, got.message_id)
        finally:
            await svc.stop()
    finally:
        await slow.stop()
    text = got.final["text"]
    assert "".join(got.deltas) == text
    assert got.slow_done_at_first_delta == 0, "the first text waited for the slow specialist"
    first, second = text.split("\n\n")
    assert first_says in first and then_says not in first
    assert then_says in second and first_says not in second
    assert got.deltas[0] in first, "the fast part streamed first"
    assert (slow_one, "tool_followup") in calls and (None, "aggregate") not in calls
    said = sentences(text)
    assert len(said) == len(set(said)), f"a sentence repeated: {text!r}"


@pytest.mark.parametrize(
    ("question", "composed"),
    [
        # The coupon has expired: nothing on money to contradict the refund's amount.
        ("订单ORD-1002的云感缓震跑步鞋有质量问题想退货，顺便问下优惠券SUMMER30还能用吗", False),
        # A valid coupon's value next to the order's amount: a model reconciles them.
        ("I want a refund for order ORD-1002. Also, is coupon SAVE50 still valid?", True),
    ],
    ids=["no-money-clash", "money-clash"],
)
async def test_a_refund_and_a_coupon_are_composed_only_where_both_state_money(
    svc: RunningService, question: str, composed: bool
) -> None:
    got = await asyncio.wait_for(stream_answer(svc, question), 30)
    text = got.final["text"]
    assert "".join(got.deltas) == text
    calls = await calls_of(svc, got.message_id)
    assert ("discount", "reply") in calls and ("refund", "reply") in calls
    assert ((None, "aggregate") in calls) is composed
    parts = text.split("\n\n")
    assert len(parts) == 2, text
    coupon = "SAVE50" if composed else "SUMMER30"
    # The pricing specialist's part leads (where money is reconciled, what it said stands).
    assert coupon in parts[0] and coupon not in parts[1]
    assert "ORD-1002" in parts[1]
    said = sentences(text)
    assert len(said) == len(set(said)), f"a sentence repeated: {text!r}"
