"""A failing model never leaves the shopper without an answer (issue: walking skeleton, LLM
client). Faults are injected in the simulator; everything else runs for real."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, update

from bot.settings import Settings
from orchestration.llm.simulator import Simulator
from storage.models import Conversation, HandoffEvent, LLMCall
from tests.support import RunningService, eventually, sse_events, start_service


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
    async with svc.services.pipeline.sessions() as s:
        rows = (await s.execute(select(LLMCall).order_by(LLMCall.id))).scalars()
        return [(c.model, c.outcome) for c in rows]


async def test_server_error_falls_back_to_next_model_invisibly(
    sqlite_service: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "500")
    _, _, deltas, final = await asyncio.wait_for(ask(sqlite_service, "hi, what sizes?"), 30)
    assert deltas and "".join(deltas) == final["text"]
    assert await ledger(sqlite_service) == [("sim-a", "server_error"), ("sim-b", "ok")]


async def test_stream_cut_midway_continues_without_repeating(
    sqlite_service: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "cut")
    _, _, deltas, final = await asyncio.wait_for(
        ask(sqlite_service, "how do I return a jacket? [[sim:tokens=30]]"), 30
    )
    # What the shopper saw is exactly the stored answer: the cut part once, then the rest.
    assert "".join(deltas) == final["text"]
    assert await ledger(sqlite_service) == [("sim-a", "stream_cut"), ("sim-b", "ok")]


async def test_hanging_model_times_out_then_falls_back(
    tmp_path: Path, settings_factory: Callable[..., Settings], simulator: Simulator
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    settings = settings_factory(url)
    settings.providers[0].first_token_timeout_seconds = 0.5
    svc = await start_service(settings)
    try:
        await queue_fault(simulator, "hang")
        _, _, deltas, final = await asyncio.wait_for(ask(svc, "any discount today?"), 30)
        assert "".join(deltas) == final["text"]
        assert await ledger(svc) == [("sim-a", "timeout"), ("sim-b", "ok")]
    finally:
        await svc.stop()


async def test_when_every_model_fails_the_shopper_is_told_and_a_person_is_called(
    sqlite_service: RunningService, simulator: Simulator
) -> None:
    svc = sqlite_service
    await queue_fault(simulator, "500", count=2)
    cid, _, _, final = await asyncio.wait_for(ask(svc, "where is ORD-1?"), 30)
    assert final["text"] == svc.services.settings.reply.fallback_text
    assert await ledger(svc) == [("sim-a", "server_error"), ("sim-b", "server_error")]
    async with svc.services.pipeline.sessions() as s:
        conv = await s.get(Conversation, cid)
        events = list((await s.execute(select(HandoffEvent))).scalars())
    assert conv is not None and conv.owner == "handoff_requested"
    assert [(e.from_owner, e.to_owner, e.reason) for e in events] == [
        ("bot", "handoff_requested", "model_failure")
    ]


async def test_rate_limit_is_classified_and_the_next_model_answers(
    sqlite_service: RunningService, simulator: Simulator
) -> None:
    await queue_fault(simulator, "429", retry_after=30)
    _, _, _, final = await asyncio.wait_for(ask(sqlite_service, "coupon code?"), 30)
    assert final["text"]
    assert await ledger(sqlite_service) == [("sim-a", "rate_limit"), ("sim-b", "ok")]


async def test_bot_stays_silent_while_a_human_owns_the_conversation(
    sqlite_service: RunningService,
) -> None:
    svc = sqlite_service
    r = await svc.post(contact_id="quinn", text="first")
    cid = r.json()["conversation_id"]
    await eventually(lambda: svc.answered(cid, r.json()["message_id"]))
    async with svc.services.pipeline.sessions() as s, s.begin():
        await s.execute(update(Conversation).where(Conversation.id == cid).values(owner="human"))
    r2 = await svc.post(contact_id="quinn", conversation_id=cid, text="are you a person?")
    mid2 = r2.json()["message_id"]

    async def handled() -> list[dict[str, Any]] | None:
        msgs = await svc.messages(cid)
        return msgs if any(m["id"] == mid2 and m["status"] == "human" for m in msgs) else None

    msgs = await eventually(handled)
    assert [m["direction"] for m in msgs] == ["in", "out", "in"]
