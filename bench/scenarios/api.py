"""Scenario `api`: open-loop load on the HTTP API channel, answered by the model simulator.

Starts the simulator and the service as subprocesses, measures the simulator's own first-token
latency, then sends shopper messages at a fixed rate (Poisson or evenly spaced arrivals) over
many conversations, each followed on its Server-Sent Events stream, and records per message
the POST latency and the time from sending the POST to the answer's first delta and final.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import common, processes
from bench.sse import SseEvent, SseParser

NAME = "api"
HELP = "open-loop messages through POST /api/v1/messages, answers read from the SSE stream"

API_KEY = "benchkey"
REPO = common.REPO_ROOT
# --orchestration single: one specialist for every message, no LLM routing, so an answer is
# exactly one model call and first-delta latency minus the model's is the service's overhead.
SINGLE_ORCHESTRATION: dict[str, Any] = {
    "routing": {"llm_below": 0},
    "specialists": [
        {
            "name": "general",
            "intents": ["other"],
            "system_prompt": "You are the shop's customer-service assistant. Answer briefly.",
        }
    ],
}
# The simulator provider's models, one per tier the default specialists use.
SIM_MODELS = {"cheap": ("sim-cheap", 0.27, 1.10), "premium": ("sim-premium", 1.10, 4.40)}
TARGET_P99_OVERHEAD_MS = 5.0
# Default conversation cap: enough for every reply to take this much longer than the model.
CONVERSATION_SLACK_S = 2.0

QUESTIONS = (
    "Where is my order?",
    "When will my parcel arrive?",
    "Can I change the delivery address?",
    "How do I return a pair of shoes?",
    "Do you ship to Canada?",
    "My package arrived damaged, what now?",
    "Can I cancel my order?",
    "Is this jacket available in size M?",
    "How long does a refund take?",
    "Do you have a discount code for students?",
    "Why was my card declined?",
    "Can I pay with PayPal?",
    "The tracking number does not work.",
    "How do I reset my password?",
    "Is the blue kettle back in stock?",
    "Can I add an item to my order?",
    "What is your warranty on headphones?",
    "I received the wrong colour.",
    "Do you offer gift wrapping?",
    "How much is express shipping?",
    "我的订单什么时候发货？",
    "这个优惠券怎么用？",
    "这件衣服有大码吗？",
    "退货运费谁承担？",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, required=True, help="messages per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument(
        "--conversations",
        type=int,
        default=None,
        help="at most this many conversations; a message goes to an idle one, else a new one "
        "opens, else (at the cap) it queues behind the least busy one. Default: rate x "
        f"(simulated reply time + {CONVERSATION_SLACK_S:g} s), which keeps one message "
        "outstanding per conversation while the service keeps up",
    )
    common.add_simulator_arguments(p)
    common.add_db_arguments(p)
    p.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline-requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="unmeasured messages before the load")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="wait for late answers")
    p.add_argument(
        "--provider-max-concurrency",
        type=int,
        default=None,
        help="providers[].max_concurrency of the simulator provider (default: the service's)",
    )
    p.add_argument(
        "--orchestration",
        choices=("single", "service-default"),
        default="single",
        help="single: one specialist, no LLM routing: one model call per answer, so the "
        "first-delta overhead is the pipeline's. service-default: the service's own routing "
        "and specialists (routing, tools, several model calls per answer); also for commits "
        "older than the specialists",
    )
    p.add_argument(
        "--service",
        choices=("swarmdesk", "floor"),
        default="swarmdesk",
        help="floor: bench/floor_relay.py instead of swarmdesk, a bare aiohttp relay with the "
        "same network work per message and nothing else (no database, no orchestration): "
        "what any single Python process of this shape adds on this machine",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="benchmark this git commit/branch (exported to the temp dir) instead of the "
        "working tree, e.g. HEAD while the tree is mid-edit",
    )
    p.add_argument(
        "--service-config",
        type=Path,
        default=None,
        help="YAML merged over the generated service config (e.g. reply: or specialists:)",
    )
    common.add_output_arguments(p, profile=True)
    common.add_workspace_arguments(p, tmp_dir=True)


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
        if self.cap is None or len(self.convs) < self.cap or not live:
            c = Conv(key=len(self.convs), contact=f"bench-{self.tag}-{len(self.convs)}")
            self.convs.append(c)
            return c
        self.counters["sent_to_busy_conversation"] += 1
        return min(live, key=lambda c: c.outstanding)

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
        gaps = random.Random(self.rng.random())
        offsets: list[float] = []
        t = gaps.expovariate(rate) if arrival == "poisson" else 0.0
        while t < duration:
            offsets.append(t)
            t += gaps.expovariate(rate) if arrival == "poisson" else 1.0 / rate
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


# --- the run ------------------------------------------------------------------------------


def conversation_cap(args: argparse.Namespace) -> int:
    if args.conversations is not None:
        return int(args.conversations)
    tps = float(args.sim_tps)
    reply_s = float(args.sim_first_token_ms) / 1000 + (args.reply_tokens / tps if tps > 0 else 0)
    return max(1, math.ceil(float(args.rate) * (reply_s + CONVERSATION_SLACK_S)))


def service_config(
    path: Path,
    *,
    port: int,
    db_url: str,
    sim_port: int,
    max_concurrency: int | None,
    orchestration: str,
    overrides: Path | None,
) -> None:
    models = [
        {"name": name, "input_price_per_mtok": pin, "output_price_per_mtok": pout}
        for name, pin, pout in SIM_MODELS.values()
    ]
    options = {} if max_concurrency is None else {"max_concurrency": max_concurrency}
    config: dict[str, Any] = {
        **common.base_service_config(port, db_url),
        "providers": [common.simulator_provider(sim_port, models, **options)],
        "tiers": {tier: [f"sim/{m[0]}"] for tier, m in SIM_MODELS.items()},
        "worker": {"max_concurrent_conversations": 1024},
    }
    if orchestration == "single":
        config.update(SINGLE_ORCHESTRATION)
    if overrides is not None:
        extra = yaml.safe_load(overrides.read_text("utf-8")) or {}
        if not isinstance(extra, dict):
            raise SystemExit(f"bench: {overrides}: expected a mapping of config sections")
        config = common.deep_merge(config, extra)
    common.write_yaml(path, config)


_DEGRADED_TEXTS_SCRIPT = """
import json, sys
from bot.settings import load_settings
s = load_settings(sys.argv[1])
texts = [getattr(s.reply, "fallback_text", None), getattr(s.reply, "fallback_text_zh", None)]
texts += [getattr(sp, "degraded_text", None) for sp in getattr(s, "specialists", [])]
print(json.dumps([t for t in texts if isinstance(t, str) and t]))
"""


def degraded_texts(config: Path, env: dict[str, str] | None) -> frozenset[str]:
    """The texts the service answers with when no model could (read by the service's code)."""
    done = subprocess.run(
        [sys.executable, "-c", _DEGRADED_TEXTS_SCRIPT, str(config)],
        env=env,
        cwd=config.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        texts = json.loads(done.stdout)
    except ValueError:
        print(
            "bench: could not read the fallback texts from the service settings; degraded "
            f"answers are counted from the service's metrics only ({done.stderr.strip()[-300:]})"
        )
        return frozenset()
    return frozenset(str(t) for t in texts)


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    db = "floor" if args.service == "floor" else args.db
    stem = f"api-{db}-r{args.rate:g}{('-' + args.tag) if args.tag else ''}"
    with processes.Workspace("bench-", parent=args.tmp_dir, keep=args.keep_tmp) as ws:
        sim = ws.simulator(common.simulator_options(args))
        svc = (
            ws.floor_relay(sim)
            if args.service == "floor"
            else ws.service(env={"SWARMDESK_API_KEY": API_KEY}, profile=args.profile)
        )
        ws.use_ref(args.ref)
        print(f"bench: temp dir {ws.tmp}; service code from {args.ref or 'the working tree'}")
        async with ws.database(args.db, args.pg_admin_dsn) as db_url:
            service_config(
                ws.config_path,
                port=svc.port,
                db_url=db_url,
                sim_port=sim.port,
                max_concurrency=args.provider_max_concurrency,
                orchestration=args.orchestration,
                overrides=args.service_config,
            )
            sim.start()
            svc.start()
            measured = await _measure(args, sim, svc, ws.config_path)
            # Processes stop here (service first), then the PostgreSQL database is dropped.
        measured.update(ws.service_outcome(svc))
        result = _result(args, measured)
        files = common.save_results(
            args.out,
            stem,
            result,
            lambda png: _plot(result, measured, png),
            service_log=svc.log_path,
            profile=ws.profile_path if args.profile else None,
        )
        print(_summary(result, files))
        return 0 if result["ok"] else 1


async def _measure(
    args: argparse.Namespace,
    sim: common.ManagedProcess,
    svc: common.ManagedProcess,
    config_path: Path,
) -> dict[str, Any]:
    async with common.http_client(sock_read_s=60) as http:
        m = await before_load(http, args, sim, svc)
        load = ApiLoad(
            http,
            svc.url,
            max_conversations=conversation_cap(args),
            seed=args.seed,
            degraded_texts=degraded_texts(config_path, svc.env),
            tag_model_calls=True,
        )
        await load.warmup(args.warmup)
        announce = f"bench: sending {args.rate:g} msg/s for {args.duration:g} s ({args.arrival})"
        return await measure_load(http, args, sim, svc, load, m, announce)


async def before_load(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    sim: common.ManagedProcess,
    svc: common.ManagedProcess,
) -> dict[str, Any]:
    """Both processes ready, the machine quiet (`--wait-quiet`), the simulator baseline."""
    await common.wait_all_ready(http, sim, svc)
    print(f"bench: simulator pid {sim.pid} :{sim.port}, service pid {svc.pid} :{svc.port}")
    procs = common.psutil_processes({"service": svc, "simulator": sim, "loadgen": None})
    other_before = await common.wait_quiet(list(procs.values()), args.wait_quiet)
    if other_before >= 0.25:
        print(
            f"bench: WARNING other processes keep {other_before:.2f} of "
            f"{os.cpu_count()} cores busy: expect noisy latencies"
        )
    baseline, baseline_failures = await common.simulator_baseline(
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
    sim: common.ManagedProcess,
    svc: common.ManagedProcess,
    load: ApiLoad,
    m: dict[str, Any],
    announce: str,
) -> dict[str, Any]:
    """Drive `load` (after `before_load` gave `m`), measuring CPU, RSS, the service's
    counters and the simulator's stats over it; returns `m` with all that added."""
    metrics0 = await common.service_metrics(http, svc.url)
    sim_stats0 = await common.simulator_stats(http, sim.url)
    rss = common.RssSampler(m["procs"])
    rss_before = int(m["procs"]["service"].memory_info().rss)
    usage = common.CpuWindow(rss.procs)
    rss.start()
    print(announce)
    try:
        times = await load.drive(args.rate, args.duration, args.arrival, args.drain_timeout)
    finally:
        await rss.stop()
    usage.stop()
    await load.close()
    metrics1 = await common.service_metrics(http, svc.url)
    sim_stats1 = await common.simulator_stats(http, sim.url)
    sim_timings = await common.simulator_timings(http, sim.url)
    m.update(
        load=load,
        times=times,
        cpu=usage.cpu,
        machine_busy_s=usage.machine_busy_s,
        rss=rss,
        rss_before=rss_before,
        metrics=common.counter_deltas(metrics0, metrics1),
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
    shift = common.percentile([(msg.final or 0) - msg.sent for msg in answered], 50)
    if math.isnan(shift):
        shift = 0.0
    return sum(
        1 for msg in answered if start + shift <= (msg.final or 0) <= start + duration + shift
    )


# --- results ------------------------------------------------------------------------------


def _result(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    load: ApiLoad = m["load"]
    times: dict[str, float] = m["times"]
    start, end = times["start"], times["end"]
    msgs = load.msgs
    post_ms = [
        x for x in (msg.ms(msg.posted) for msg in msgs if msg.status == 202) if x is not None
    ]
    answered = [msg for msg in msgs if msg.final is not None]
    first_ms = [x for x in (msg.ms(msg.first_delta) for msg in answered) if x is not None]
    final_ms = [x for x in (msg.ms(msg.final) for msg in answered) if x is not None]
    lag_ms = load.send_lag_ms()
    baseline: list[float] = m["baseline"]

    window_end = start + args.duration
    finals_in_window = sum(1 for msg in answered if start <= (msg.final or 0) <= window_end)
    shifted = finals_shifted(answered, start, args.duration)
    accepted = [msg for msg in msgs if msg.status == 202]
    # No answer and no error: the POST or the answer had not arrived when the drain ended.
    unanswered = [msg for msg in msgs if msg.final is None and msg.error is None]
    stream_error_msgs = [msg for msg in accepted if msg.final is None and msg.error]
    first = common.summarize(first_ms)
    base = common.summarize(baseline)
    overhead = common.overhead_ms(first, base)
    split = _split_by_model_call(answered, m.get("sim_timings", {}))

    cpu: dict[str, float] = m["cpu"]
    wall = end - start
    rss: common.RssSampler = m["rss"]
    counters = load.counters
    counts = {
        "sent": len(msgs),
        "accepted": len(accepted),
        "answered": len(answered),
        "unanswered": len(unanswered),
        "unanswered_post_pending": sum(1 for msg in unanswered if msg.status is None),
        "not_sent_waiting_for_conversation": sum(1 for msg in msgs if math.isnan(msg.sent)),
        "degraded": sum(1 for msg in answered if msg.degraded),
        "duplicates": counters["duplicate_finals"],
        "answered_without_delta": sum(1 for msg in answered if msg.first_delta is None),
        "errors": load.errors(),
        "post_errors": counters["post_errors"],
        "stream_error_events": counters["error_events"],
        "messages_failed_by_error_event": len(stream_error_msgs),
        "stream_http_errors": counters["stream_http_errors"],
        "stream_disconnects": counters["stream_disconnects"],
        "stream_reconnects": counters["stream_reconnects"],
        "conversations": len(load.convs),
        "conversations_retired": sum(1 for c in load.convs if c.retired),
        "sent_to_busy_conversation": counters["sent_to_busy_conversation"],
        "warmup_messages": args.warmup,
        "events": {
            k: v for k, v in sorted(counters.items()) if k.endswith(("_events", "_replayed"))
        },
    }
    outcomes: Counter[str] = Counter()
    for name, value in m["metrics"].items():
        if name.startswith("swarmdesk_replies_total{") and 'outcome="' in name:
            outcomes[name.split('outcome="', 1)[1].split('"', 1)[0]] += int(value)
    counts["service_replies_by_outcome"] = dict(outcomes)
    sim_requests = m["sim_stats"].get("requests")
    counts["simulator_requests"] = sim_requests
    # Judged per message without the simulator's own time where the simulator timed the
    # calls; else (an older --ref's simulator) against the direct baseline.
    judged = split["added"]["p99"] if split["added"]["count"] else overhead["p99"]
    met = judged is not None and judged <= TARGET_P99_OVERHEAD_MS
    problems: list[str] = []
    if counts["unanswered"]:
        problems.append(f"{counts['unanswered']} unanswered")
    if counts["duplicates"]:
        problems.append(f"{counts['duplicates']} duplicate finals")
    if counts["errors"]:
        problems.append(f"{counts['errors']} errors")
    degraded = max(counts["degraded"], outcomes.get("degraded", 0))
    if degraded:
        problems.append(f"{degraded} degraded answers")
    return {
        "scenario": NAME,
        "created_at": common.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "conversations": args.conversations,
            "conversation_cap": conversation_cap(args),
            "sim_first_token_ms": args.sim_first_token_ms,
            "sim_tps": args.sim_tps,
            "reply_tokens": args.reply_tokens,
            "db": args.db,
            "arrival": args.arrival,
            "seed": args.seed,
            "baseline_requests": args.baseline_requests,
            "warmup": args.warmup,
            "drain_timeout_s": args.drain_timeout,
            "provider_max_concurrency": args.provider_max_concurrency,
            "tag": args.tag,
            "orchestration": args.orchestration,
            "tmp_dir": str(args.tmp_dir) if args.tmp_dir else tempfile.gettempdir(),
            "service_config_overrides": str(args.service_config) if args.service_config else None,
        },
        "environment": common.environment(),
        "service_code": m["service_code"],
        "rate_requested": args.rate,
        "rate_sent": round(len(msgs) / args.duration, 2),
        "messages_per_s_achieved": round(finals_in_window / args.duration, 2),
        "messages_per_s_achieved_shifted": round(shifted / args.duration, 2),
        "llm_requests_per_message": round(sim_requests / len(msgs), 3)
        if isinstance(sim_requests, int) and msgs
        else None,
        "latency_ms": {
            "post": common.summarize(post_ms),
            "first_delta": first,
            "final": common.summarize(final_ms),
        },
        "simulator_baseline_ms": {
            "first_token": base,
            "failures": m["baseline_failures"],
        },
        "service_overhead_ms": overhead,
        # Per message, with the simulator's own time (request in -> first token out) taken
        # out: what the service (and the load generator reading the stream) added.
        "service_overhead_without_simulator_ms": split,
        "target": {
            "p99_first_delta_overhead_ms_max": TARGET_P99_OVERHEAD_MS,
            "judged_on": "service_overhead_without_simulator_ms.added"
            if split["added"]["count"]
            else "service_overhead_ms",
            "met": met,
            "applies": args.db == "sqlite" and args.rate >= 100,
        },
        "cpu": {
            "window_s": round(wall, 2),
            "service_s": round(cpu["service"], 2),
            "service_s_per_1000_messages": round(cpu["service"] / len(answered) * 1000, 2)
            if answered
            else None,
            "service_core_share": round(cpu["service"] / wall, 3),
            "simulator_s": round(cpu["simulator"], 2),
            "simulator_core_share": round(cpu["simulator"] / wall, 3),
            "loadgen_s": round(cpu["loadgen"], 2),
            "loadgen_core_share": round(cpu["loadgen"] / wall, 3),
            "machine_busy_cores": round(m["machine_busy_s"] / wall, 3),
            # Everything else on the machine (other people's tests, ...) during the load.
            "other_processes_cores": round(
                max(0.0, m["machine_busy_s"] - sum(cpu.values())) / wall, 3
            ),
            "other_processes_cores_before": round(m["other_cores_before"], 3),
        },
        "memory_mb": {
            "service_peak_rss": rss.peak_mb("service"),
            "service_rss_before": round(m["rss_before"] / 2**20, 1),
            "simulator_peak_rss": rss.peak_mb("simulator"),
            "loadgen_peak_rss": rss.peak_mb("loadgen"),
        },
        "counts": counts,
        "client": {
            "load_started_at": datetime.fromtimestamp(times["wall_start"], UTC).isoformat(),
            "stream_open_ms": common.summarize(
                [c.stream_open_ms for c in load.convs if c.stream_open_ms is not None]
            ),
            "send_lag_ms": common.summarize(lag_ms),
            "last_post_after_start_s": round(times["last_post"] - start, 2),
            "drain_s": round(end - times["last_post"], 2),
        },
        "notes": load.notes,
        "service_metrics": m["metrics"],
        "simulator_stats": m["sim_stats"],
        "service_log": m["service_log"],
        "service_exit_code": m["service_exit_code"],
        "ok": not problems,
        "problems": problems,
        "warnings": _warnings(m, wall, lag_ms),
    }


def _split_by_model_call(answered: list[Msg], timings: dict[str, list[float]]) -> dict[str, Any]:
    """First-delta latency of each message whose model call the simulator timed, split into
    POST -> model request arrived, the simulator's own time to its first token, and first
    token written -> first delta read; `added` is the first and last together."""
    before: list[float] = []
    own: list[float] = []
    after: list[float] = []
    added: list[float] = []
    for msg in answered:
        t = timings.get(msg.client_id)
        if t is None or msg.first_delta is None:
            continue
        arrived, first_out = t
        before.append((arrived - msg.sent) * 1000)
        own.append((first_out - arrived) * 1000)
        after.append((msg.first_delta - first_out) * 1000)
        added.append(before[-1] + after[-1])
    return {
        "added": common.summarize(added),
        "post_to_model_request": common.summarize(before),
        "simulator_own": common.summarize(own),
        "model_first_token_to_first_delta": common.summarize(after),
    }


def _warnings(m: dict[str, Any], wall: float, lag_ms: list[float]) -> list[str]:
    """Reasons to distrust the figures that are not the service's fault."""
    out: list[str] = []
    other = max(0.0, m["machine_busy_s"] - sum(m["cpu"].values())) / wall
    if other >= 0.25:
        out.append(
            f"other processes used {other:.2f} cores during the load: latencies are noisy "
            "(rerun with --wait-quiet on a quiet machine)"
        )
    lag = common.percentile(lag_ms, 99)
    if lag > 20:
        out.append(f"the load generator sent late (p99 {lag:.0f} ms): it may be the limit")
    return out


def _plot(result: dict[str, Any], m: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    load: ApiLoad = m["load"]
    start = m["times"]["start"]
    answered = [msg for msg in load.msgs if msg.final is not None]
    first_ms = [msg.ms(msg.first_delta) for msg in answered if msg.first_delta is not None]
    final_ms = [msg.ms(msg.final) for msg in answered]
    series = {
        "simulator first token (direct)": m["baseline"],
        "service first delta": [x for x in first_ms if x is not None],
        "service final": [x for x in final_ms if x is not None],
    }
    p = result["parameters"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    fig.suptitle(
        f"swarmdesk api: {p['db']}, {p['rate']:g} msg/s for {p['duration_s']:g} s; sim "
        f"{p['sim_first_token_ms']:g} ms first token, {p['sim_tps']:g} tok/s, "
        f"{p['reply_tokens']} tokens; overhead p50 {result['service_overhead_ms']['p50']} ms, "
        f"p99 {result['service_overhead_ms']['p99']} ms"
    )
    ax = axes[0]
    common.plot_percentiles(ax, series, "ms")
    ax.set_title("latency by percentile")
    ax.legend(fontsize=8)

    ax = axes[1]
    for label in ("service first delta", "service final"):
        if series[label]:
            ax.hist(series[label], bins=60, alpha=0.6, label=label)
    for value, style in ((result["simulator_baseline_ms"]["first_token"].get("p50"), "--"),):
        if value is not None:
            ax.axvline(value, color="k", linestyle=style, label="simulator p50 first token")
    ax.set_xlabel("ms after the POST was sent")
    ax.set_ylabel("messages")
    ax.set_title("histogram")
    ax.legend(fontsize=8)

    ax = axes[2]
    xs = [msg.sent - start for msg in answered if msg.first_delta is not None]
    ax.scatter(xs, series["service first delta"], s=3, label="first delta")
    posted = [msg for msg in load.msgs if msg.posted is not None]
    ax.scatter(
        [msg.sent - start for msg in posted],
        [msg.ms(msg.posted) for msg in posted],
        s=2,
        alpha=0.5,
        label="POST response",
    )
    unanswered = [msg.sent - start for msg in load.msgs if msg.final is None]
    if unanswered:
        ax.scatter(unanswered, [0] * len(unanswered), s=8, c="r", marker="x", label="unanswered")
    ax.set_xlabel("s since the load started (send time)")
    ax.set_ylabel("ms after the POST was sent")
    ax.set_title("latency by send time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(plt, fig, path)


def _row(label: str, s: dict[str, Any]) -> str:
    return common.latency_row(label, s, 30)


def _split_rows(split: dict[str, Any]) -> list[str]:
    if not split["added"].get("count"):
        return []  # a simulator without [[sim:tag]] timings (an older --ref)
    return [
        "",
        common.latency_header("first delta, split at the model", 30),
        _row("POST -> model request in", split["post_to_model_request"]),
        _row("simulator's own (in -> 1st out)", split["simulator_own"]),
        _row("model 1st token -> 1st delta", split["model_first_token_to_first_delta"]),
        _row("added (1st + 3rd line)", split["added"]),
    ]


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    p, c, cpu, mem = r["parameters"], r["counts"], r["cpu"], r["memory_mb"]
    lat, over = r["latency_ms"], r["service_overhead_ms"]
    added = r["service_overhead_without_simulator_ms"]["added"]
    target = r["target"]
    verdict = "met" if target["met"] else "NOT met"
    if not target["applies"]:
        verdict += ", the target is for sqlite at 100 msg/s"
    log = r["service_log"]
    lines = [
        "",
        f"== swarmdesk bench api: {p['db']}, {p['rate']:g} msg/s requested for "
        f"{p['duration_s']:g} s ({p['arrival']}), {c['conversations']} conversations "
        f"(cap {p['conversation_cap']}) ==",
        f"simulator: {p['sim_first_token_ms']:g} ms to first token, {p['sim_tps']:g} tok/s, "
        f"{p['reply_tokens']} tokens per reply; provider max_concurrency "
        f"{p['provider_max_concurrency'] or 'service default'}; orchestration "
        f"{p['orchestration']}; service code: {r['service_code']['source']} "
        f"{r['service_code'].get('commit')} ({r['service_code'].get('uncommitted_files', 0)} "
        "uncommitted files)",
        f"sent {c['sent']} ({r['rate_sent']:g}/s), accepted {c['accepted']}, answered "
        f"{c['answered']}, unanswered {c['unanswered']}, degraded {c['degraded']}, "
        f"duplicates {c['duplicates']}, errors {c['errors']}",
        f"answered without any delta seen {c['answered_without_delta']}, messages queued behind "
        f"a busy conversation {c['sent_to_busy_conversation']}",
        f"finals/s during the window {r['messages_per_s_achieved']:g} (window shifted by the "
        f"median reply time: {r['messages_per_s_achieved_shifted']:g})",
        f"model calls per message {r['llm_requests_per_message']}; service replies by outcome "
        f"{c['service_replies_by_outcome']}",
        "",
        common.latency_header("latency, ms from POST sent", 30),
        _row("POST response", lat["post"]),
        _row("first delta", lat["first_delta"]),
        _row("final", lat["final"]),
        _row("SSE stream open (GET->headers)", r["client"]["stream_open_ms"]),
        _row("simulator first token (direct)", r["simulator_baseline_ms"]["first_token"]),
        *_split_rows(r["service_overhead_without_simulator_ms"]),
        "",
        f"service overhead at first delta: p50 {common.fmt_ms(over['p50'])} ms, p99 "
        f"{common.fmt_ms(over['p99'])} ms beyond the direct baseline; "
        + (
            f"per message beyond the simulator's own time p50 {common.fmt_ms(added['p50'])} ms, "
            f"p99 {common.fmt_ms(added['p99'])} ms"
            if added["count"]
            else "(no per-message split: the simulator did not time the calls)"
        )
        + f" (target p99 <= {target['p99_first_delta_overhead_ms_max']:g} ms: {verdict})",
        f"service CPU {cpu['service_s']:g} s in {cpu['window_s']:g} s "
        f"({cpu['service_core_share']:.0%} of a core), "
        f"{common.fmt_ms(cpu['service_s_per_1000_messages'])} CPU-s per 1000 messages; "
        f"simulator {cpu['simulator_core_share']:.0%}, load generator "
        f"{cpu['loadgen_core_share']:.0%} of a core",
        f"machine: {cpu['machine_busy_cores']:.2f} of {r['environment']['cpu_count']} cores busy; "
        f"other processes {cpu['other_processes_cores']:.2f} cores during the load "
        f"({cpu['other_processes_cores_before']:.2f} just before)",
        f"service RSS peak {mem['service_peak_rss']:g} MB (before the load "
        f"{mem['service_rss_before']:g} MB)",
        f"load generator send lag p99 {common.fmt_ms(r['client']['send_lag_ms']['p99'])} ms, "
        f"stream reconnects {c['stream_reconnects']}, drain after last POST "
        f"{r['client']['drain_s']:g} s",
    ]
    if log["counts"]:
        top = ", ".join(f"{k} x{v}" for k, v in list(log["counts"].items())[:6])
        lines.append(f"service log: {top}")
    else:
        lines.append("service log: no warnings or errors")
    return "\n".join(lines + common.summary_tail(r, files))
