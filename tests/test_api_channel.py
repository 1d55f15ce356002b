"""The HTTP API channel end to end: POST a message, watch the streamed answer, read history."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from bot.settings import Settings
from storage.models import LLMCall
from tests.support import RunningService, SseEvent, eventually, sse_events, start_service


async def collect_answer(
    svc: RunningService, conversation_id: int, after: int, *, last_event_id: str | None = None
) -> list[SseEvent]:
    """Read the stream until the first final (or error) event."""
    headers = dict(svc.headers)
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    got: list[SseEvent] = []
    url = f"/api/v1/conversations/{conversation_id}/stream"
    params = {} if last_event_id else {"after": after}
    async with svc.client.stream("GET", url, headers=headers, params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for ev in sse_events(r):
            got.append(ev)
            if ev.event in ("final", "error"):
                break
    return got


async def test_message_streams_answer_that_matches_stored_one(service: RunningService) -> None:
    r = await service.post(contact_id="alice", text="where is my parcel?", client_message_id="a1")
    assert r.status_code == 202
    body = r.json()
    cid, mid, seq = body["conversation_id"], body["message_id"], body["seq"]

    events = await asyncio.wait_for(collect_answer(service, cid, after=seq - 1), 30)
    kinds = [e.event for e in events]
    assert kinds[0] == "message" and events[0].data["text"] == "where is my parcel?"
    deltas = [e for e in events if e.event == "delta"]
    assert len(deltas) >= 2, "the answer must arrive in pieces"
    assert [d.data["index"] for d in deltas] == list(range(len(deltas)))
    final = events[-1]
    assert final.event == "final"
    assert "".join(d.data["text"] for d in deltas) == final.data["text"]
    assert final.data["reply_to_id"] == mid

    stored = await eventually(lambda: service.answered(cid, mid))
    assert stored["text"] == final.data["text"]
    assert stored["seq"] == final.data["seq"] == deltas[0].data["seq"]

    # The attempt is in the ledger with its tokens and cost.
    async with service.services.sessions() as s:
        calls = list((await s.execute(select(LLMCall))).scalars())
    assert len(calls) == 1
    call = calls[0]
    assert (call.provider, call.model, call.outcome) == ("sim", "sim-a", "ok")
    assert call.output_tokens > 0 and call.input_tokens > 0 and not call.usage_estimated
    expected = (call.input_tokens * 1.0 + call.output_tokens * 2.0) / 1_000_000
    assert abs(call.cost - expected) < 1e-12
    assert call.first_token_ms is not None and call.latency_ms is not None


async def test_redelivered_message_is_answered_once(service: RunningService) -> None:
    first = await service.post(contact_id="bob", text="do you ship to Lyon?", client_message_id="x")
    again = await asyncio.gather(
        *(
            service.post(contact_id="bob", text="do you ship to Lyon?", client_message_id="x")
            for _ in range(5)
        )
    )
    assert first.status_code == 202
    for r in again:
        assert r.status_code == 200 and r.json()["duplicate"] is True
        assert r.json()["message_id"] == first.json()["message_id"]
    cid, mid = first.json()["conversation_id"], first.json()["message_id"]
    await eventually(lambda: service.answered(cid, mid))
    await asyncio.sleep(0.3)  # room for a wrong second answer to show up
    msgs = await service.messages(cid)
    assert [m["direction"] for m in msgs] == ["in", "out"]


async def test_messages_of_a_conversation_are_answered_in_order(service: RunningService) -> None:
    first = await service.post(contact_id="carol", text="message 0", client_message_id="c0")
    cid = first.json()["conversation_id"]
    inbound = [first.json()["message_id"]]
    others = asyncio.gather(
        *(service.post(contact_id=f"other-{i}", text=f"hello {i}") for i in range(20))
    )
    for i in range(1, 50):
        r = await service.post(
            contact_id="carol", conversation_id=cid, text=f"message {i}", client_message_id=f"c{i}"
        )
        inbound.append(r.json()["message_id"])
    other_ids = [(r.json()["conversation_id"], r.json()["message_id"]) for r in await others]

    async def all_answered() -> list[dict[str, Any]] | None:
        msgs = await service.messages(cid)
        answers = [m for m in msgs if m["direction"] == "out"]
        if len(answers) == 50 and all(m["status"] == "sent" for m in answers):
            return msgs
        return None

    msgs = await eventually(all_answered, timeout=60)
    answers = [m for m in msgs if m["direction"] == "out"]
    # Each answer replies to the next question in order, and is stored after it.
    assert [a["reply_to_id"] for a in answers] == inbound
    seq_of = {m["id"]: m["seq"] for m in msgs}
    assert all(a["seq"] > seq_of[a["reply_to_id"]] for a in answers)
    # An answer started only after the previous one finished: seqs of answers ascend.
    assert [a["seq"] for a in answers] == sorted(a["seq"] for a in answers)
    for ocid, omid in other_ids:
        await eventually(lambda c=ocid, m=omid: service.answered(c, m))


async def test_reconnect_with_last_event_id_resumes_without_gap(
    sqlite_service: RunningService,
) -> None:
    svc = sqlite_service
    r = await svc.post(
        contact_id="dan", text="tell me about returns [[sim:tps=40]] [[sim:tokens=30]]"
    )
    cid, seq = r.json()["conversation_id"], r.json()["seq"]
    url = f"/api/v1/conversations/{cid}/stream"
    seen: list[SseEvent] = []
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": seq - 1}) as s:
        async for ev in sse_events(s):
            seen.append(ev)
            if ev.event == "delta" and ev.data["index"] == 4:
                break  # the connection drops mid-answer
    last_id = seen[-1].id
    assert last_id is not None
    rest = await asyncio.wait_for(collect_answer(svc, cid, 0, last_event_id=last_id), 30)
    deltas = [e for e in seen + rest if e.event == "delta"]
    assert [d.data["index"] for d in deltas] == list(range(len(deltas))), "no gap, no duplicate"
    assert rest[-1].event == "final"
    assert "".join(d.data["text"] for d in deltas) == rest[-1].data["text"]
    # A client that comes back after the answer finished gets the final from storage.
    again = await asyncio.wait_for(collect_answer(svc, cid, 0, last_event_id=last_id), 30)
    assert [e.event for e in again] == ["final"]


async def test_history_pages_by_seq(sqlite_service: RunningService) -> None:
    svc = sqlite_service
    r = await svc.post(contact_id="erin", text="q0", client_message_id="e0")
    cid = r.json()["conversation_id"]
    await eventually(lambda: svc.answered(cid, r.json()["message_id"]))
    for i in range(1, 3):
        r = await svc.post(contact_id="erin", conversation_id=cid, text=f"q{i}")
        mid = r.json()["message_id"]
        await eventually(lambda m=mid: svc.answered(cid, m))
    page = await svc.client.get(
        f"/api/v1/conversations/{cid}/messages", params={"limit": 2}, headers=svc.headers
    )
    body = page.json()
    assert [m["seq"] for m in body["messages"]] == [5, 6] and body["has_more"] is True
    older = await svc.client.get(
        f"/api/v1/conversations/{cid}/messages",
        params={"limit": 2, "before": 5},
        headers=svc.headers,
    )
    assert [m["seq"] for m in older.json()["messages"]] == [3, 4]
    newer = await svc.client.get(
        f"/api/v1/conversations/{cid}/messages",
        params={"limit": 10, "after": 4},
        headers=svc.headers,
    )
    assert [m["seq"] for m in newer.json()["messages"]] == [5, 6]
    assert newer.json()["has_more"] is False


async def test_health_and_readiness(sqlite_service: RunningService) -> None:
    assert (await sqlite_service.client.get("/healthz")).json() == {"status": "ok"}
    ready = await sqlite_service.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["migration"] == ["0007"]
    metrics = await sqlite_service.client.get("/metrics")
    assert "swarmdesk_messages_received_total" in metrics.text

    # What a busy process's tail is made of: its garbage collections and the loop's lag.
    gc.collect()
    await asyncio.sleep(0.6)  # one lag sample
    text = (await sqlite_service.client.get("/metrics")).text
    assert 'swarmdesk_gc_pause_seconds_count{generation="2"}' in text
    assert _sample(text, "swarmdesk_event_loop_lag_seconds_count") >= 1


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


async def test_bad_input_gets_clear_errors_and_loses_nothing(
    sqlite_service: RunningService,
) -> None:
    svc = sqlite_service
    c = svc.client
    h = {**svc.headers, "Content-Type": "application/json"}

    async def expect(resp: httpx.Response, status: int, code: str) -> None:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"] == code
        assert resp.json()["detail"]

    await expect(
        await c.post("/api/v1/messages", content=b"{not json", headers=h), 400, "invalid_json"
    )
    await expect(await c.post("/api/v1/messages", content=b"[1,2]", headers=h), 400, "invalid_json")
    await expect(
        await c.post("/api/v1/messages", json={"text": "hi"}, headers=h), 422, "missing_field"
    )
    await expect(
        await c.post("/api/v1/messages", json={"contact_id": "z", "text": "  "}, headers=h),
        422,
        "invalid_field",
    )
    await expect(
        await c.post(
            "/api/v1/messages", json={"contact_id": "z", "text": "x", "colour": 1}, headers=h
        ),
        422,
        "unknown_field",
    )
    big = {"contact_id": "z", "text": "x" * 70_000}
    await expect(await c.post("/api/v1/messages", json=big, headers=h), 413, "body_too_large")
    await expect(
        await c.post(
            "/api/v1/messages",
            json={"contact_id": "z", "text": "hi"},
            headers={"X-Api-Key": "wrong"},
        ),
        401,
        "unauthorized",
    )
    await expect(
        await c.post("/api/v1/messages", json={"contact_id": "z", "text": "hi"}),
        401,
        "unauthorized",
    )
    await expect(
        await c.post(
            "/api/v1/messages",
            json={"contact_id": "z", "text": "hi", "conversation_id": 999},
            headers=h,
        ),
        404,
        "not_found",
    )
    await expect(await c.get("/api/v1/conversations/999/messages", headers=h), 404, "not_found")
    await expect(await c.get("/api/v1/conversations/abc/stream", headers=h), 404, "not_found")
    await expect(await c.get("/no/such/route"), 404, "not_found")

    # Someone else's conversation is not yours to write to.
    r = await svc.post(contact_id="owner", text="mine")
    await expect(
        await c.post(
            "/api/v1/messages",
            json={
                "contact_id": "intruder",
                "text": "x",
                "conversation_id": r.json()["conversation_id"],
            },
            headers=h,
        ),
        404,
        "not_found",
    )

    # After all that, the service still answers, and only the valid messages were stored.
    ok = await svc.post(contact_id="z", text="still there?")
    assert ok.status_code == 202
    await eventually(lambda: svc.answered(ok.json()["conversation_id"], ok.json()["message_id"]))
    msgs = await svc.messages(ok.json()["conversation_id"])
    assert [m["text"] for m in msgs if m["direction"] == "in"] == ["still there?"]


@pytest.mark.parametrize("flush_ms", [0, 1000])
async def test_tokens_close_together_reach_the_stream_together(
    sqlite_url: str, settings_factory: Callable[..., Settings], flush_ms: int
) -> None:
    """`reply.stream_flush_ms`: the first token goes out at once, the ones that follow within
    the window together; 0 passes every token on by itself. No text is lost either way."""
    svc = await start_service(settings_factory(sqlite_url, reply={"stream_flush_ms": flush_ms}))
    try:
        # Six tokens 100 ms apart.
        text = "hello there [[sim:tps=10,tokens=6]]"
        r = await svc.post(contact_id="flush", text=text, client_message_id="f1")
        body = r.json()
        events = await asyncio.wait_for(
            collect_answer(svc, body["conversation_id"], after=body["seq"] - 1), 30
        )
        async with svc.services.sessions() as s:
            (call,) = list((await s.execute(select(LLMCall))).scalars())
    finally:
        await svc.stop()
    deltas = [e.data["text"] for e in events if e.event == "delta"]
    assert "".join(deltas) == events[-1].data["text"]
    assert call.output_tokens == 6
    if flush_ms == 0:
        assert len(deltas) == 6
    else:
        assert len(deltas) == 2  # the first token, then the other five at the end
