"""A failing model never leaves the shopper without an answer (issue: walking skeleton, LLM
client). Faults are injected in the simulator; everything else runs for real."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from bot.settings import Settings
from simulator.server import Simulator
from storage.models import Conversation, HandoffEvent, LLMCall
from tests.support import RunningService, eventually, sse_events, start_service


@pytest.fixture
async def svc(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    """No retries of the same model, no hedging, one walk of the chain: a fault moves
    straight to the next model, and a failed chain gives the canned answer."""
    s = await start_service(
        settings_factory(
            sqlite_url,
            resilience={"retries": 0, "hedge_after_seconds": None, "chain_walks": 1},
        )
    )
    yield s
    await s.stop()


async def queue_fault(sim: Simulator, fault: str, count: int = 1, **extra: Any) -> None:
    async with httpx.AsyncClient() as c:
        url = sim.base_url.removesuffix("/v1") + "/_sim/faults"
        r = await c.post(url, json={"fault": fault, "count": count, **extra})
        r.raise_for_status()


async def ask(svc: RunningService, text: str) -> tuple[int, int, list[str], dict[str, Any]]:
    """Post a question; return ids, the deltas seen on the stream and the final event."""
    r = await svc.post(contact_id="pat", text=text)
    cid, mid, seq = r.json()["conversation_id"], r.json()["message_id"], r.json()["seq"]
    deltas: list[str] = []
    url = f"/api/v1/conversations/{cid}/stream"
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": seq}) as s:
        async for ev in sse_events(s):
            if ev.event == "delta":
                deltas.append(ev.data["text"])
            if ev.event == "final":
                return cid, mid, deltas, ev.data
    raise AssertionError("stream ended without a final answer")


async def ledger(svc: RunningService) -> list[tuple[str, str]]:
    """The attempts of each turn's first answer round (no classification, no tool rounds)."""
    async with svc.services.sessions() as s:
        rows = (await s.execute(select(LLMCall).order_by(LLMCall.id))).scalars()
        return [(c.model, c.outcome) for c in rows if c.purpose == "reply"]


async def test_server_error_falls_back_to_next_model_invisibly(
    svc: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "500")
    _, _, deltas, final = await asyncio.wait_for(ask(svc, "hi, what sizes?"), 30)
    assert deltas and "".join(deltas) == final["text"]
    assert await ledger(svc) == [("sim-a", "server_error"), ("sim-b", "ok")]


async def test_stream_cut_midway_continues_without_repeating(
    svc: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "cut")
    _, _, deltas, final = await asyncio.wait_for(
        ask(svc, "how do I return a jacket? [[sim:tokens=30]]"), 30
    )
    # What the shopper saw is exactly the stored answer: the cut part once, then the rest.
    assert "".join(deltas) == final["text"]
    assert await ledger(svc) == [("sim-a", "stream_cut"), ("sim-b", "ok")]


async def test_hanging_model_times_out_then_falls_back(
    tmp_path: Path, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    settings = settings_factory(url)
    settings.providers[0].first_token_timeout_seconds = 0.5
    settings.resilience.hedge_after_seconds = None
    svc = await start_service(settings)
    try:
        await queue_fault(simulator, "hang")
        _, _, deltas, final = await asyncio.wait_for(ask(svc, "any discount today?"), 30)
        assert "".join(deltas) == final["text"]
        assert await ledger(svc) == [("sim-a", "timeout"), ("sim-b", "ok")]
    finally:
        await svc.stop()


async def test_when_every_model_fails_the_shopper_is_told_and_twice_means_a_person(
    svc: RunningService,
) -> None:
    # The directive makes every model call of the turn fail, whichever model it reaches.
    text = "hello, are you there? [[sim:fault=500]]"
    cid, _, deltas, final = await asyncio.wait_for(ask(svc, text), 30)
    general = next(s for s in svc.services.settings.specialists if s.name == "general")
    assert final["text"] == general.degraded_text
    # (An instant answer may be over before the stream opens; then only the final is seen.)
    assert "".join(deltas) in ("", final["text"])
    assert await ledger(svc) == [("sim-a", "server_error"), ("sim-b", "server_error")]

    async def owner() -> str:
        async with svc.services.sessions() as s:
            conv = await s.get(Conversation, cid)
            assert conv is not None
            return conv.owner

    assert await owner() == "bot"  # one canned answer: the bot keeps trying
    r = await svc.post(contact_id="pat", conversation_id=cid, text=text)
    await eventually(lambda: svc.answered(cid, r.json()["message_id"]))
    assert await owner() == "handoff_requested"
    async with svc.services.sessions() as s:
        events = list((await s.execute(select(HandoffEvent))).scalars())
    assert [(e.from_owner, e.to_owner, e.reason) for e in events] == [
        ("bot", "handoff_requested", "fallback_twice")
    ]


async def test_rate_limit_is_classified_and_the_next_model_answers(
    svc: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "429", retry_after=30)
    _, _, _, final = await asyncio.wait_for(ask(svc, "coupon code?"), 30)
    assert final["text"]
    assert await ledger(svc) == [("sim-a", "rate_limit"), ("sim-b", "ok")]


async def test_bot_stays_silent_while_a_human_owns_the_conversation(
    svc: RunningService,
) -> None:
    r = await svc.post(contact_id="quinn", text="first")
    cid = r.json()["conversation_id"]
    await eventually(lambda: svc.answered(cid, r.json()["message_id"]))
    async with svc.services.sessions() as s, s.begin():
        await s.execute(update(Conversation).where(Conversation.id == cid).values(owner="human"))
    r2 = await svc.post(contact_id="quinn", conversation_id=cid, text="are you a person?")
    mid2 = r2.json()["message_id"]

    async def handled() -> list[dict[str, Any]] | None:
        msgs = await svc.messages(cid)
        return msgs if any(m["id"] == mid2 and m["status"] == "human" for m in msgs) else None

    msgs = await eventually(handled)
    assert [m["direction"] for m in msgs] == ["in", "out", "in"]


async def test_a_server_error_is_retried_on_the_same_model_before_the_next(
    sqlite_service: RunningService, simulator: Simulator
) -> None:
    """Default resilience: one retry with backoff before the first token."""
    await queue_fault(simulator, "500")
    _, _, deltas, final = await asyncio.wait_for(ask(sqlite_service, "hi there, good morning!"), 30)
    assert "".join(deltas) == final["text"]
    assert await ledger(sqlite_service) == [("sim-a", "server_error"), ("sim-a", "ok")]


async def test_a_failed_chain_is_walked_again_while_the_turn_has_time(
    sqlite_url: str, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    svc = await start_service(
        settings_factory(sqlite_url, resilience={"retries": 0, "hedge_after_seconds": None})
    )
    try:
        await queue_fault(simulator, "cut", count=2)  # both models of the chain, in turn
        _, _, deltas, final = await asyncio.wait_for(ask(svc, "hi there, good morning!"), 30)
        general = next(s for s in svc.services.settings.specialists if s.name == "general")
        assert final["text"] != general.degraded_text, "a model answered, not canned text"
        assert "".join(deltas) == final["text"]
        assert await ledger(svc) == [
            ("sim-a", "stream_cut"),
            ("sim-b", "stream_cut"),
            ("sim-a", "ok"),
        ]
    finally:
        await svc.stop()


async def test_when_every_model_is_cooling_after_429s_the_turn_waits_instead_of_giving_up(
    sqlite_url: str, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    svc = await start_service(
        settings_factory(sqlite_url, resilience={"retries": 0, "hedge_after_seconds": None})
    )
    try:
        await queue_fault(simulator, "429", count=2, retry_after=1)
        _, _, _, final = await asyncio.wait_for(ask(svc, "hi there, good morning!"), 30)
        general = next(s for s in svc.services.settings.specialists if s.name == "general")
        assert final["text"] != general.degraded_text
        assert await ledger(svc) == [
            ("sim-a", "rate_limit"),
            ("sim-b", "rate_limit"),
            ("sim-a", "ok"),
        ]
    finally:
        await svc.stop()
