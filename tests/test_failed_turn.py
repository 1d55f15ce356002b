"""A turn that raises (a database error storing the answer, an account gone from the
config) is tried again; after the last try the shopper gets the fallback text and a person
is asked for, and clients stop showing "typing" — never silence until a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from storage import answers
from tests.support import RunningService, SseEvent, eventually, sse_events


def failing(times: int | None) -> tuple[Any, list[int]]:
    """finish_answer that raises a database error the first `times` calls (None: always)."""
    real = answers.finish_answer
    calls: list[int] = []

    def finish(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if times is None or len(calls) <= times:
            raise OperationalError("UPDATE messages", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    return finish, calls


async def stream_until_end(svc: RunningService, cid: int, after: int) -> list[SseEvent]:
    got: list[SseEvent] = []
    url = f"/api/v1/conversations/{cid}/stream"
    async with svc.client.stream("GET", url, headers=svc.headers, params={"after": after}) as r:
        async for ev in sse_events(r):
            got.append(ev)
            if ev.event in ("final", "error"):
                return got
    return got


async def owner(svc: RunningService, cid: int) -> str:
    r = await svc.client.get(f"/api/v1/conversations/{cid}/messages", headers=svc.headers)
    return str(r.json()["owner"])


async def test_answer_not_stored_three_times_becomes_fallback_and_handoff(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    finish, calls = failing(3)
    monkeypatch.setattr(answers, "finish_answer", finish)
    r = await service.post(contact_id="dora", text="where is my parcel?")
    body = r.json()
    cid, mid, seq = body["conversation_id"], body["message_id"], body["seq"]
    events = await asyncio.wait_for(stream_until_end(service, cid, seq), 60)
    final = events[-1]
    fallback = service.services.settings.reply.fallback_text
    assert final.event == "final" and final.data["text"] == fallback
    assert len(calls) == 4  # three tries, then the fallback stored
    stored = await eventually(lambda: service.answered(cid, mid))
    assert stored["text"] == fallback
    assert await owner(service, cid) == "handoff_requested"
    assert service.services.pipeline.hub.inflight(cid) is None


async def test_database_down_for_good_ends_typing_with_an_error_event(
    sqlite_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = sqlite_service
    finish, calls = failing(None)
    monkeypatch.setattr(answers, "finish_answer", finish)
    r = await svc.post(contact_id="eve", text="hello?")
    body = r.json()
    cid, seq = body["conversation_id"], body["seq"]
    events = await asyncio.wait_for(stream_until_end(svc, cid, seq), 60)
    assert [e.event for e in events if e.event != "delta"][-2:] == ["typing", "error"]
    assert events[-1].data["seq"] == seq + 1
    assert svc.services.pipeline.hub.inflight(cid) is None
    assert len(calls) == 4
    # The database is back: the next message is answered as usual.
    monkeypatch.undo()
    again = (await svc.post(contact_id="eve", text="anyone?")).json()
    assert await eventually(lambda: svc.answered(cid, again["message_id"]))


async def test_channel_account_gone_gives_fallback_and_handoff(
    sqlite_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = sqlite_service
    api = svc.services.channels["api"]

    def gone(*args: Any) -> Any:
        raise KeyError("account 'main' is not in the configuration")

    monkeypatch.setattr(api, "open_reply", gone)
    r = await svc.post(contact_id="fay", text="is the shop open?")
    body = r.json()
    cid, mid = body["conversation_id"], body["message_id"]
    stored = await eventually(lambda: svc.answered(cid, mid), timeout=60)
    assert stored["text"] == svc.services.settings.reply.fallback_text
    assert await owner(svc, cid) == "handoff_requested"
    assert svc.services.pipeline.hub.inflight(cid) is None
