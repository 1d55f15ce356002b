"""The open-loop load on the HTTP API channel that scenarios `api` and `orchestration` run.

`ApiLoad` sends shopper messages over many conversations (POST /api/v1/messages) and follows
each conversation's Server-Sent Events stream, recording per message the POST latency and
the times of the answer's first delta and final. `before_load` and `measure_load` are the
phases around it: readiness and the simulator baseline, then the load measured (CPU, RSS,
the service's counters, the simulator's stats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import processes, prometheus, sampling, simulator_http, stats
from bench.api_service import API_KEY
from bench.arrivals import arrival_offsets
from bench.questions import QUESTIONS
from bench.sse import SseEvent, SseParser

# --- records ----------------------------------------------------------------------------


@dataclass(slots=True)
class Msg:
    index: int
    warmup: bool
    scheduled: float
    conv: Conv | None = None
    sent: float = math.nan
    posted: float | None = None
    status: int | None = None
    message_id: int | None = None
    seq: int | None = None
    first_delta: float | None = None
    final: float | None = None
    final_seqs: list[int] = field(default_factory=list)
    degraded: bool = False
    error: str | None = None
    settled: bool = False
    waited_for_conversation: bool = False  # queued behind the POST that creates it
    text: str = ""  # what was sent
    client_id: str = ""

    def ms(self, t: float | None) -> float | None:
        return None if t is None else (t - self.sent) * 1000.0


@dataclass(slots=True, eq=False)
class Conv:
    key: int
    contact: str
    id: int | None = None
    outstanding: int = 0
    retired: bool = False  # handed off after a degraded answer, or could not be created
    create_started: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    first_delta_at: dict[int, float] = field(default_factory=dict)  # answer seq -> time
    finals_seen: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    stream_open_ms: float | None = None  # GET sent -> response headers, first connection


@dataclass(slots=True)
class LateFinal:
    """A final whose inbound message id we have not learnt yet (POST still in flight)."""

    reply_to_id: int
    seq: int
    at: float
    first_delta: float | None
    degraded: bool


# --- the load -----------------------------------------------------------------------------


class ApiLoad:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        max_conversations: int | None,
        seed: int,
        degraded_texts: frozenset[str] = frozenset(),
        message_text: Callable[[random.Random], str] | None = None,
        tag_model_calls: bool = False,
    ) -> None:
        # Each message asks the simulator to record its model call's timing
        # ([[sim:tag=<client message id>]]), to tell the simulator's delays from the service's.
        self.tag_model_calls = tag_model_calls
        # Draws each message's text (default: one of QUESTIONS).
        self.message_text = message_text
        self.degraded_texts = degraded_texts
        self.http = http
        self.base = base_url
        self.cap = max_conversations
        self.rng = random.Random(seed)
        self.tag = uuid.uuid4().hex[:8]
        self.headers = {"X-Api-Key": API_KEY}
        self.msgs: list[Msg] = []
        self.by_id: dict[int, Msg] = {}
        self.convs: list[Conv] = []
        self.idle: deque[Conv] = deque()
        self.late: dict[int, list[LateFinal]] = {}
        self.counters: Counter[str] = Counter()
        self.notes: list[str] = []  # first few unexpected things, verbatim
        self.outstanding = 0
        self.all_settled = asyncio.Event()  # set whenever nothing is outstanding
        self.stopping = False
        self._send_tasks: set[asyncio.Task[None]] = set()

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text[:500])

    # -- conversations -------------------------------------------------------------------

    def _pick_conversation(self) -> Conv:
        while self.idle:
            c = self.idle.popleft()
            if not c.retired and c.outstanding == 0:
                return c
        live = [c for c in self.convs if not c.retired]
        if self.cap is None or self._counted(live) < self.cap or not live:
            c = Conv(key=len(self.convs), contact=f"bench-{self.tag}-{len(self.convs)}")
            self.convs.append(c)
            return c
        self.counters["sent_to_busy_conversation"] += 1
        return min(live, key=lambda c: c.outstanding)

    def _counted(self, live: list[Conv]) -> int:
        """The conversations the cap counts: every one opened (retired ones too)."""
        return len(self.convs)

    def _settle(self, msg: Msg) -> None:
        if msg.settled:
            return
        msg.settled = True
        conv = msg.conv
        assert conv is not None
        conv.outstanding -= 1
        if conv.outstanding == 0 and not conv.retired:
            self.idle.append(conv)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.all_settled.set()

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Msg) -> None:
        conv = self._pick_conversation()
        msg.conv = conv
        conv.outstanding += 1
        self.outstanding += 1
        self.all_settled.clear()
        creating = conv.id is None and not conv.create_started
        conv.create_started = True
        task = asyncio.create_task(self._post(msg, conv, creating))
        self._send_tasks.add(task)
        task.add_done_callback(self._send_tasks.discard)

    async def _post(self, msg: Msg, conv: Conv, creating: bool) -> None:
        if conv.id is None and not creating:
            msg.waited_for_conversation = True
            await conv.ready.wait()  # its first message is still being posted
            if conv.id is None:
                msg.error = "conversation could not be created"
                self.counters["post_errors"] += 1
                self._settle(msg)
                return
        msg.text = (
            self.message_text(self.rng)
            if self.message_text is not None
            else self.rng.choice(QUESTIONS)
        )
        client_id = msg.client_id = f"{self.tag}-{msg.index}{'w' if msg.warmup else ''}"
        body: dict[str, Any] = {
            "contact_id": conv.contact,
            "text": f"{msg.text} [[sim:tag={client_id}]]" if self.tag_model_calls else msg.text,
            "client_message_id": client_id,
            # Signed in as the demo shop's shopper, so order questions reach the order tools.
            "shop_user_id": "demo-shopper",
        }
        if conv.id is not None:
            body["conversation_id"] = conv.id
        msg.sent = time.perf_counter()
        payload: dict[str, Any] | None = None
        try:
            async with self.http.post(
                f"{self.base}/api/v1/messages", json=body, headers=self.headers
            ) as r:
                msg.status = r.status
                if r.status == 202:
                    payload = await r.json()
                else:
                    msg.error = f"HTTP {r.status}: {(await r.text())[:300]}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            msg.error = f"{type(e).__name__}: {e}"
        msg.posted = time.perf_counter()
        if payload is None:
            self.counters["post_errors"] += 1
            self.note(f"POST #{msg.index}: {msg.error}")
            if creating:
                conv.retired = True
                conv.ready.set()
            self._settle(msg)
            return
        if payload.get("duplicate"):
            self.counters["post_said_duplicate"] += 1
        msg.message_id = int(payload["message_id"])
        msg.seq = int(payload["seq"])
        self.by_id[msg.message_id] = msg
        if creating:
            conv.id = int(payload["conversation_id"])
            conv.ready.set()
            conv.task = asyncio.create_task(self._follow(conv, after=msg.seq - 1))
        for late in self.late.pop(msg.message_id, ()):
            self._final(msg, late.seq, late.at, late.first_delta, late.degraded)

    # -- the stream ----------------------------------------------------------------------

    async def _follow(self, conv: Conv, after: int) -> None:
        """Read the conversation's SSE stream until stopped; reconnect with Last-Event-ID."""
        last_id: str | None = None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        while not self.stopping:
            headers = dict(self.headers)
            url = f"{self.base}/api/v1/conversations/{conv.id}/stream"
            if last_id is None:
                url += f"?after={after}"
            else:
                headers["Last-Event-ID"] = last_id
            opened = time.perf_counter()
            try:
                async with self.http.get(url, headers=headers, timeout=timeout) as r:
                    if conv.stream_open_ms is None:
                        conv.stream_open_ms = (time.perf_counter() - opened) * 1000
                    if r.status != 200:
                        self.counters["stream_http_errors"] += 1
                        self.note(f"stream {conv.id}: HTTP {r.status}: {(await r.text())[:300]}")
                    else:
                        parser = SseParser()
                        async for chunk in r.content.iter_any():
                            now = time.perf_counter()
                            for ev in parser.feed(chunk):
                                try:
                                    self._on_event(conv, ev, now)
                                except (ValueError, KeyError, TypeError) as e:
                                    self.counters["unreadable_events"] += 1
                                    self.note(f"unreadable {ev.event} event ({e!r}): {ev.data}")
                            last_id = parser.last_id or last_id
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError) as e:
                if not self.stopping:
                    self.counters["stream_disconnects"] += 1
                    self.note(f"stream {conv.id}: {type(e).__name__}: {e}")
            if self.stopping:
                return
            self.counters["stream_reconnects"] += 1
            await asyncio.sleep(0.2)

    def _on_event(self, conv: Conv, ev: SseEvent, now: float) -> None:
        kind = ev.event
        if kind == "delta":
            seq = int(json.loads(ev.data)["seq"])
            self.counters["delta_events"] += 1
            if seq not in conv.finals_seen:
                conv.first_delta_at.setdefault(seq, now)
            return
        self.counters[f"{kind}_events"] += 1
        if kind not in ("final", "error"):
            return  # message (the shopper's own), typing
        data = json.loads(ev.data)
        seq = int(data["seq"])
        reply_to = data.get("reply_to_id")
        if seq in conv.finals_seen:
            self.counters[f"{kind}_replayed"] += 1  # the same stored message again (resume)
            return
        conv.finals_seen.add(seq)
        first_delta = conv.first_delta_at.pop(seq, None)
        if kind == "error":
            self.note(f"error event on conversation {conv.id}: {ev.data[:300]}")
            msg = self.by_id.get(reply_to) if isinstance(reply_to, int) else None
            if msg is not None and not msg.settled:
                msg.error = f"error event: {ev.data[:200]}"
                self._settle(msg)
            return
        if not isinstance(reply_to, int):
            self.counters["finals_without_reply_to"] += 1
            self.note(f"final without reply_to_id on conversation {conv.id}: {ev.data[:300]}")
            return
        degraded = data.get("text") in self.degraded_texts
        msg = self.by_id.get(reply_to)
        if msg is None:  # the POST's answer has not reached us yet
            self.late.setdefault(reply_to, []).append(
                LateFinal(reply_to, seq, now, first_delta, degraded)
            )
            return
        self._final(msg, seq, now, first_delta, degraded)

    def _final(
        self, msg: Msg, seq: int, at: float, first_delta: float | None, degraded: bool
    ) -> None:
        msg.final_seqs.append(seq)
        if len(msg.final_seqs) > 1:
            self.counters["duplicate_finals"] += 1
            self.note(f"message {msg.message_id}: another final, seqs {msg.final_seqs}")
            return
        msg.final = at
        msg.first_delta = first_delta
        msg.degraded = degraded
        if degraded:
            assert msg.conv is not None
            msg.conv.retired = True  # the service handed it to a human: no more bot answers
        self._settle(msg)

    # -- phases --------------------------------------------------------------------------

    async def warmup(self, count: int, timeout_s: float = 30.0) -> None:
        """Unmeasured messages: first connections, caches, a few open conversations."""
        if count <= 0:
            return
        msgs = [Msg(index=i, warmup=True, scheduled=time.perf_counter()) for i in range(count)]
        for m in msgs:
            self.send(m)
            await asyncio.sleep(0.02)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_settled.wait(), timeout_s)
        if self.outstanding:
            raise RuntimeError(f"warm-up: {self.outstanding} of {count} messages not answered")
        bad = [m for m in msgs if m.error or m.degraded]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0].error or 'degraded answer'}")

    async def drive(
        self, rate: float, duration: float, arrival: str, drain_timeout: float
    ) -> dict[str, float]:
        """Send for `duration` s at `rate`/s, then wait up to `drain_timeout` s for answers.

        The wait starts when the last message is sent, not when its POST is answered: POST
        responses and answers still missing at the end count as unanswered.
        """
        offsets = arrival_offsets(random.Random(self.rng.random()), rate, arrival, duration)
        wall_start = time.time()
        start = time.perf_counter()
        for i, offset in enumerate(offsets):
            at = start + offset
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            msg = Msg(index=i, warmup=False, scheduled=at)
            self.msgs.append(msg)
            self.send(msg)
        last_post = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_settled.wait(), drain_timeout)
        return {
            "wall_start": wall_start,
            "start": start,
            "last_post": last_post,
            "end": time.perf_counter(),
        }

    def send_lag_ms(self) -> list[float]:
        """How late each measured message went out against its schedule (one that waited
        for its conversation to be created is late by design, not counted)."""
        return [
            (msg.sent - msg.scheduled) * 1000
            for msg in self.msgs
            if not math.isnan(msg.sent) and not msg.waited_for_conversation
        ]

    def errors(self) -> int:
        """Failed POSTs, error events, stream HTTP errors and finals that match nothing."""
        c = self.counters
        return (
            c["post_errors"]
            + c["error_events"]
            + c["stream_http_errors"]
            + c["finals_without_reply_to"]
            + c["unreadable_events"]
            + c["finals_for_unknown_messages"]
        )

    async def close(self) -> None:
        self.stopping = True
        tasks = [c.task for c in self.convs if c.task is not None]
        self.counters["posts_unfinished_at_end"] = len(self._send_tasks)
        tasks += list(self._send_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pending in self.late.values():
            self.counters["finals_for_unknown_messages"] += len(pending)


async def before_load(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
) -> dict[str, Any]:
    """Both processes ready, the machine quiet (`--wait-quiet`), the simulator baseline."""
    await processes.wait_all_ready(http, sim, svc)
    print(f"bench: simulator pid {sim.pid} :{sim.port}, service pid {svc.pid} :{svc.port}")
    procs = sampling.psutil_processes({"service": svc, "simulator": sim, "loadgen": None})
    other_before = await sampling.wait_quiet(list(procs.values()), args.wait_quiet)
    if other_before >= 0.25:
        print(
            f"bench: WARNING other processes keep {other_before:.2f} of "
            f"{os.cpu_count()} cores busy: expect noisy latencies"
        )
    baseline, baseline_failures = await simulator_http.simulator_baseline(
        http, f"{sim.url}/v1", args.baseline_requests, args.rate, QUESTIONS
    )
    return {
        "procs": procs,
        "other_cores_before": other_before,
        "baseline": baseline,
        "baseline_failures": baseline_failures,
    }


async def measure_load(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
    load: ApiLoad,
    m: dict[str, Any],
    announce: str,
) -> dict[str, Any]:
    """Drive `load` (after `before_load` gave `m`), measuring CPU, RSS, the service's
    counters and the simulator's stats over it; returns `m` with all that added."""
    metrics0 = await prometheus.service_metrics(http, svc.url)
    sim_stats0 = await simulator_http.simulator_stats(http, sim.url)
    rss = sampling.RssSampler(m["procs"])
    rss_before = int(m["procs"]["service"].memory_info().rss)
    usage = sampling.CpuWindow(rss.procs)
    rss.start()
    print(announce)
    try:
        times = await load.drive(args.rate, args.duration, args.arrival, args.drain_timeout)
    finally:
        await rss.stop()
    usage.stop()
    await load.close()
    metrics1 = await prometheus.service_metrics(http, svc.url)
    sim_stats1 = await simulator_http.simulator_stats(http, sim.url)
    sim_timings = await simulator_http.simulator_timings(http, sim.url)
    m.update(
        load=load,
        times=times,
        cpu=usage.cpu,
        machine_busy_s=usage.machine_busy_s,
        rss=rss,
        rss_before=rss_before,
        metrics=prometheus.counter_deltas(metrics0, metrics1),
        sim_timings=sim_timings,
        sim_stats={
            k: v - sim_stats0.get(k, 0) if isinstance(v, int | float) else v
            for k, v in sim_stats1.items()
        },
    )
    return m


def finals_shifted(answered: list[Msg], start: float, duration: float) -> int:
    """Finals in the load window moved by the median reply time: answers lag their messages
    by that much, so this matches what was sent while the service keeps up."""
    shift = stats.percentile([(msg.final or 0) - msg.sent for msg in answered], 50)
    if math.isnan(shift):
        shift = 0.0
    return sum(
        1 for msg in answered if start + shift <= (msg.final or 0) <= start + duration + shift
    )


def _warnings(m: dict[str, Any], wall: float, lag_ms: list[float]) -> list[str]:
    """Reasons to distrust the figures that are not the service's fault."""
    out: list[str] = []
    other = max(0.0, m["machine_busy_s"] - sum(m["cpu"].values())) / wall
    if other >= 0.25:
        out.append(
            f"other processes used {other:.2f} cores during the load: latencies are noisy "
            "(rerun with --wait-quiet on a quiet machine)"
        )
    lag = stats.percentile(lag_ms, 99)
    if lag > 20:
        out.append(f"the load generator sent late (p99 {lag:.0f} ms): it may be the limit")
    return out


def closing_keys(
    m: dict[str, Any], problems: list[str], wall: float, lag_ms: list[float]
) -> dict[str, Any]:
    """The last keys of a result of this load: the load's notes, the service's counters and
    the simulator's stats over it, the service's log and exit code, the verdict, warnings."""
    load: ApiLoad = m["load"]
    return {
        "notes": load.notes,
        "service_metrics": m["metrics"],
        "simulator_stats": m["sim_stats"],
        "service_log": m["service_log"],
        "service_exit_code": m["service_exit_code"],
        "ok": not problems,
        "problems": problems,
        "warnings": _warnings(m, wall, lag_ms),
    }
