"""Scenario `widget`: thousands of idle widget WebSockets plus active chats, against the
model simulator.

Starts the simulator and the service as subprocesses, opens `--idle` widget connections that
say hello and then only answer pings (visitors with a shop page open), then sends visitor
messages at `--rate` per second over other widget connections for `--duration` seconds.

Measured: the service's peak RSS (and what the idle connections cost), and per delta the
time from leaving orchestration to reaching the visitor's socket. The service runs with
`channels.widget.delta_timestamps: true`, so every delta frame carries `t`, the service's
time.monotonic() when the pipeline took the delta from the orchestrator and published it;
the load generator reads time.monotonic() as soon as the frame is out of its socket.
CLOCK_MONOTONIC is one clock for every process of a Linux machine, so the difference is
the delta's trip: event bus, the connection's pump, JSON, the WebSocket write, the kernel,
and the load generator's own read (an upper bound: the last part is the client's). The
service's own histogram of the first part (up to the socket write) is reported alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import options, plots, processes, prometheus, report, result_files, sampling, stats
from bench.arrivals import arrival_offsets
from bench.http_client import fetch_text, http_client
from bench.questions import QUESTIONS
from bench.service_config import base_service_config, simulator_provider, write_yaml
from bench.service_log import scan_json_log

NAME = "widget"
HELP = "idle widget WebSockets + active chats: service RSS, delta-to-socket latency"

ORIGIN = "http://bench.widget.local"
SITE = "bench"
SIM_MODEL = "sim-cheap"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--idle", type=int, default=5000, help="idle widget connections")
    p.add_argument("--rate", type=float, default=50.0, help="visitor messages per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--connect-concurrency", type=int, default=100)
    options.add_simulator_arguments(p)
    p.add_argument("--warmup", type=int, default=20, help="unmeasured messages before the load")
    p.add_argument("--drain-timeout", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--provider-max-concurrency",
        type=int,
        default=256,
        help="providers[].max_concurrency of the simulator (the service's default, 32, caps "
        "50 msg/s of ~1.1 s answers below the offered load)",
    )
    options.add_db_arguments(p)
    options.add_output_arguments(p)
    options.add_workspace_arguments(p, wait_quiet=120.0)


# --- file descriptors -------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Lift the soft open-files limit (children inherit it) to what the run needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(
            f"bench: {needed} open files needed, the hard limit is {hard}; raise it "
            "(ulimit -Hn, /etc/security/limits.conf) or use fewer --idle connections"
        )
    return soft, hard


# --- connections -------------------------------------------------------------------------------


def hello(token: str) -> str:
    return json.dumps({"type": "hello", "token": token})


async def open_socket(
    http: aiohttp.ClientSession, url: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(url, headers={"Origin": ORIGIN}, heartbeat=None, autoping=True)
    await ws.send_str(hello(secrets.token_urlsafe(24)))
    msg = await ws.receive(timeout=30)
    if msg.type != aiohttp.WSMsgType.TEXT:
        await ws.close()
        raise ConnectionError(f"no ready frame: {msg.type.name} {msg.extra!r}")
    ready: dict[str, Any] = json.loads(msg.data)
    if ready.get("type") != "ready":
        await ws.close()
        raise ConnectionError(f"expected ready, got {msg.data[:200]}")
    return ws, ready


@dataclass
class IdleCrowd:
    """Visitors with the page open: connected, saying nothing, answering pings."""

    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    failed: int = 0
    dropped: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    async def open(self, http: aiohttp.ClientSession, url: str, count: int, limit: int) -> None:
        sem = asyncio.Semaphore(limit)

        async def one() -> None:
            async with sem:
                try:
                    ws, _ = await open_socket(http, url)
                except (aiohttp.ClientError, ConnectionError, TimeoutError, OSError) as e:
                    self.failed += 1
                    self.errors[type(e).__name__ + ": " + str(e)[:120]] += 1
                    return
                self.sockets.append(ws)
                self.readers.append(asyncio.create_task(self._read(ws)))

        await asyncio.gather(*(one() for _ in range(count)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # receive() answers the service's pings; it returns only when the socket ends.
        async for _ in ws:
            pass
        self.dropped += 1

    @property
    def alive(self) -> int:
        return sum(1 for ws in self.sockets if not ws.closed)

    async def close(self) -> None:
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


@dataclass(slots=True)
class Msg:
    index: int
    warmup: bool
    sent: float = 0.0
    first_delta: float | None = None
    final: float | None = None
    error: str | None = None


@dataclass(eq=False)
class Visitor:
    ws: aiohttp.ClientWebSocketResponse
    pending: deque[Msg] = field(default_factory=deque)  # answered in order, one at a time
    task: asyncio.Task[None] | None = None
    answers_seen: set[int] = field(default_factory=set)


class ActiveChats:
    """Visitors who chat: a message goes to an idle visitor, else a new one (a new page and
    conversation) up to `cap`, else it queues behind the least busy visitor."""

    def __init__(self, http: aiohttp.ClientSession, url: str, seed: int, cap: int) -> None:
        self.http = http
        self.url = url
        self.cap = cap
        self.rng = random.Random(seed)
        self.visitors: list[Visitor] = []
        self.free: list[Visitor] = []
        self.msgs: list[Msg] = []
        self.delta_ms: list[float] = []
        self.counters: Counter[str] = Counter()
        self.notes: list[str] = []
        self.outstanding = 0
        self.settled = asyncio.Event()
        self.measuring = False

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text[:300])

    async def _visitor(self) -> Visitor:
        while self.free:
            v = self.free.pop()
            if not v.pending and not v.ws.closed:
                return v
        live = [v for v in self.visitors if not v.ws.closed]
        if len(self.visitors) >= self.cap and live:
            self.counters["queued_behind_busy_visitor"] += 1
            return min(live, key=lambda v: len(v.pending))
        ws, _ = await open_socket(self.http, self.url)
        v = Visitor(ws)
        v.task = asyncio.create_task(self._read(v))
        self.visitors.append(v)
        return v

    async def send(self, msg: Msg) -> None:
        self.outstanding += 1
        self.settled.clear()
        try:
            v = await self._visitor()
        except (aiohttp.ClientError, ConnectionError, TimeoutError, OSError) as e:
            msg.error = f"connect: {e}"
            self.counters["connect_errors"] += 1
            self._settle(msg)
            return
        v.pending.append(msg)
        msg.sent = time.monotonic()
        frame = {
            "type": "send",
            "client_id": f"m{msg.index}{'w' if msg.warmup else ''}-{secrets.token_hex(3)}",
            "text": self.rng.choice(QUESTIONS),
        }
        try:
            await v.ws.send_str(json.dumps(frame, ensure_ascii=False))
        except (aiohttp.ClientError, ConnectionError) as e:
            msg.error = f"send: {e}"
            self.counters["send_errors"] += 1
            with contextlib.suppress(ValueError):
                v.pending.remove(msg)
            self._settle(msg)

    def _settle(self, msg: Msg) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self.settled.set()

    async def _read(self, v: Visitor) -> None:
        async for m in v.ws:
            if m.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            frame = json.loads(m.data)
            kind = frame.get("type")
            msg = v.pending[0] if v.pending else None
            if kind == "delta":
                self.counters["deltas"] += 1
                if self.measuring and msg is not None and not msg.warmup and "t" in frame:
                    self.delta_ms.append((now - float(frame["t"])) * 1000.0)
                if msg is not None and msg.first_delta is None:
                    msg.first_delta = now
            elif kind == "final":
                seq = int(frame["seq"])
                if seq in v.answers_seen:
                    self.counters["duplicate_finals"] += 1
                    continue
                v.answers_seen.add(seq)
                self.counters["finals"] += 1
                if msg is not None:
                    msg.final = now
                    v.pending.popleft()
                    if not v.pending:
                        self.free.append(v)
                    self._settle(msg)
            elif kind in ("problem", "error"):
                self.counters[f"{kind}_frames"] += 1
                self.note(m.data)
        self.counters["active_sockets_closed"] += 1
        while v.pending:
            msg = v.pending.popleft()
            msg.error = "socket closed"
            self._settle(msg)

    async def run(self, rate: float, duration: float, first_index: int, warmup: bool) -> None:
        start = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        gaps = random.Random(self.rng.random())
        for i, t in enumerate(arrival_offsets(gaps, rate, "poisson", duration)):
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            msg = Msg(first_index + i, warmup)
            if not warmup:
                self.msgs.append(msg)
            tasks.append(asyncio.create_task(self.send(msg)))
        await asyncio.gather(*tasks)

    async def drain(self, timeout: float) -> None:
        if self.outstanding:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), timeout)

    async def close(self) -> None:
        for v in self.visitors:
            if v.task is not None:
                v.task.cancel()
        await asyncio.gather(
            *(v.task for v in self.visitors if v.task is not None), return_exceptions=True
        )
        await asyncio.gather(*(v.ws.close() for v in self.visitors), return_exceptions=True)


# --- the run -----------------------------------------------------------------------------------


def service_config(
    path: Path, *, port: int, db_url: str, sim_port: int, idle: int, max_concurrency: int
) -> None:
    model = {"name": SIM_MODEL, "input_price_per_mtok": 0.27, "output_price_per_mtok": 1.1}
    config: dict[str, Any] = {
        **base_service_config(port, db_url),
        "providers": [simulator_provider(sim_port, [model], max_concurrency=max_concurrency)],
        "tiers": {"cheap": [f"sim/{SIM_MODEL}"], "premium": [f"sim/{SIM_MODEL}"]},
        "worker": {"max_concurrent_conversations": 1024},
        "channels": {
            "widget": {
                "sites": [{"key": SITE, "allowed_origins": [ORIGIN]}],
                "demo_site": None,
                "delta_timestamps": True,
                "heartbeat_seconds": float(os.environ.get("BENCH_WIDGET_HEARTBEAT", "30")),
                # Everyone comes from 127.0.0.1 here: lift the per-address limits.
                "rate_limits": {
                    "ip_connections": idle + 10_000,
                    "ip_messages_per_minute": 1_000_000,
                    "visitor_messages_per_minute": 1_000,
                },
                "attachments": {"dir": str(path.parent / "uploads")},
            }
        },
    }
    write_yaml(path, config)


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0 or args.idle < 0:
        raise SystemExit("bench: --rate and --duration must be positive, --idle not negative")
    # Each idle visitor is one socket in the load generator and one in the service, plus
    # the active chats, the database, the simulator's connections.
    soft, hard = raise_fd_limit(args.idle + int(args.rate * 10) + 2000)
    print(f"bench: open files limit {soft} (hard {hard})")
    tag = f"-{args.tag}" if args.tag else ""
    stem = f"widget-{args.db}-i{args.idle}-r{args.rate:g}{tag}"
    with processes.Workspace("bench-widget-", keep=args.keep_tmp) as ws:
        sim = ws.simulator(options.simulator_options(args))
        svc = ws.service(env={"SWARMDESK_API_KEY": "bench"})
        print(f"bench: temp dir {ws.tmp}")
        async with ws.database(args.db, args.pg_admin_dsn) as db_url:
            service_config(
                ws.config_path,
                port=svc.port,
                db_url=db_url,
                sim_port=sim.port,
                idle=args.idle,
                max_concurrency=args.provider_max_concurrency,
            )
            sim.start()
            svc.start()
            measured = await _measure(args, sim, svc)
            # Processes stop here (service first), then the PostgreSQL database is dropped.
        measured["service_log"] = scan_json_log(svc.log_path)
        result = _result(args, measured)
        return result_files.publish(
            args.out,
            stem,
            result,
            lambda png: _plot(result, measured, png),
            _summary,
        )


async def _measure(
    args: argparse.Namespace, sim: processes.ManagedProcess, svc: processes.ManagedProcess
) -> dict[str, Any]:
    async with http_client() as http:
        url = f"ws://127.0.0.1:{svc.port}/widget/v1/ws?site={SITE}"
        await processes.wait_all_ready(http, sim, svc)
        procs = sampling.psutil_processes({"service": svc, "simulator": sim, "loadgen": None})
        svc_proc = procs["service"]
        rss = sampling.RssSampler(procs)
        rss.start()
        marks: dict[str, float] = {"start": time.perf_counter()}
        rss_idle_before = int(svc_proc.memory_info().rss)

        crowd = IdleCrowd()
        t0 = time.monotonic()
        print(f"bench: opening {args.idle} idle widget connections")
        await crowd.open(http, url, args.idle, args.connect_concurrency)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(2)  # let the service settle before reading its memory
        rss_idle_after = int(svc_proc.memory_info().rss)
        marks["idle_open"] = time.perf_counter()
        print(
            f"bench: {len(crowd.sockets)} idle connections in {connect_s:.1f} s "
            f"({crowd.failed} failed); service RSS {rss_idle_before / 2**20:.0f} -> "
            f"{rss_idle_after / 2**20:.0f} MB"
        )

        reply_s = args.sim_first_token_ms / 1000 + args.reply_tokens / max(args.sim_tps, 1e-9)
        chats = ActiveChats(http, url, args.seed, cap=max(10, int(args.rate * (reply_s + 2))))
        await chats.run(rate=max(1.0, args.warmup / 2), duration=2.0, first_index=0, warmup=True)
        await chats.drain(20)
        other_before = await sampling.wait_quiet(list(procs.values()), args.wait_quiet)
        marks["load_start"] = time.perf_counter()
        usage = sampling.CpuWindow(procs)
        chats.measuring = True
        print(f"bench: {args.rate:g} messages/s for {args.duration:g} s")
        await chats.run(args.rate, args.duration, first_index=10_000, warmup=False)
        marks["last_send"] = time.perf_counter()
        await chats.drain(args.drain_timeout)
        chats.measuring = False
        usage.stop()
        marks["end"] = time.perf_counter()
        idle_alive = crowd.alive
        await rss.stop()
        text = await fetch_text(http, f"{svc.url}/metrics") or ""
        metrics = prometheus.parse_samples(text)
        buckets = prometheus.histogram_buckets(text, "swarmdesk_widget_delta_delivery_seconds")
        await chats.close()
        await crowd.close()
    return {
        "crowd": crowd,
        "chats": chats,
        "connect_s": connect_s,
        "rss": rss,
        "rss_idle_before": rss_idle_before,
        "rss_idle_after": rss_idle_after,
        "idle_alive": idle_alive,
        "marks": marks,
        "cpu": usage.cpu,
        "other_cores_before": other_before,
        "other_cpu_s": usage.others_s,
        "metrics": metrics,
        "buckets": buckets,
    }


def _result(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    crowd: IdleCrowd = m["crowd"]
    chats: ActiveChats = m["chats"]
    rss: sampling.RssSampler = m["rss"]
    marks = m["marks"]
    msgs = chats.msgs
    answered = [x for x in msgs if x.final is not None]
    first_ms = [(x.first_delta - x.sent) * 1000 for x in answered if x.first_delta is not None]
    final_ms = [(x.final - x.sent) * 1000 for x in answered if x.final is not None]
    window = marks["end"] - marks["load_start"]
    idle_cost = (m["rss_idle_after"] - m["rss_idle_before"]) / max(1, len(crowd.sockets))
    problems: list[str] = []
    unanswered = sum(1 for x in msgs if x.final is None)
    if unanswered:
        problems.append(f"{unanswered} unanswered")
    if chats.counters["duplicate_finals"]:
        problems.append(f"{chats.counters['duplicate_finals']} duplicate finals")
    if crowd.failed:
        problems.append(f"{crowd.failed} idle connections failed to open")
    if m["idle_alive"] < len(crowd.sockets):
        problems.append(f"{len(crowd.sockets) - m['idle_alive']} idle connections dropped")
    if not chats.delta_ms:
        problems.append("no delta timestamps (is delta_timestamps on?)")
    metrics = m["metrics"]
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "idle": args.idle,
            "rate": args.rate,
            "duration_s": args.duration,
            "sim_first_token_ms": args.sim_first_token_ms,
            "sim_tps": args.sim_tps,
            "reply_tokens": args.reply_tokens,
            "provider_max_concurrency": args.provider_max_concurrency,
            "db": args.db,
            "tag": args.tag,
        },
        "method": (
            "delta frames carry the service's time.monotonic() at the pipeline's publish of "
            "the orchestrator's delta; the load generator subtracts it from its own "
            "time.monotonic() right after reading the frame (CLOCK_MONOTONIC is shared by all "
            "processes of the machine). server_histogram_ms: the service's own measure up to "
            "the socket write (bucket upper bounds)."
        ),
        "environment": result_files.environment(),
        "idle": {
            "requested": args.idle,
            "opened": len(crowd.sockets),
            "failed": crowd.failed,
            "alive_at_end": m["idle_alive"],
            "connect_s": round(m["connect_s"], 2),
            "errors": dict(crowd.errors.most_common(5)),
        },
        "memory_mb": {
            "service_before_idle": round(m["rss_idle_before"] / 2**20, 1),
            "service_with_idle": round(m["rss_idle_after"] / 2**20, 1),
            "service_peak": rss.peak_mb("service"),
            "idle_connection_kb": round(idle_cost / 1024, 1),
            "simulator_peak": rss.peak_mb("simulator"),
            "loadgen_peak": rss.peak_mb("loadgen"),
        },
        "latency_ms": {
            "delta_to_socket": stats.summarize(chats.delta_ms, 3),
            "first_delta_from_send": stats.summarize(first_ms),
            "final_from_send": stats.summarize(final_ms),
        },
        "server_histogram_ms": {
            "p50_bucket": prometheus.bucket_quantile(m["buckets"], 0.50),
            "p99_bucket": prometheus.bucket_quantile(m["buckets"], 0.99),
            "count": metrics.get("swarmdesk_widget_delta_delivery_seconds_count"),
        },
        "counts": {
            "sent": len(msgs),
            "answered": len(answered),
            "unanswered": unanswered,
            "active_connections": len(chats.visitors),
            **dict(chats.counters),
        },
        "rate_sent": round(len(msgs) / args.duration, 2),
        "cpu": {
            "window_s": round(window, 2),
            **{f"{n}_core_share": round(v / window, 3) for n, v in m["cpu"].items()},
            "other_processes_cores": round(m["other_cpu_s"] / window, 2),
            "other_processes_cores_before": round(m["other_cores_before"], 2),
        },
        "notes": chats.notes,
        "service_log": m["service_log"],
        "ok": not problems,
        "problems": problems,
    }


def _plot(result: dict[str, Any], m: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    chats: ActiveChats = m["chats"]
    rss: sampling.RssSampler = m["rss"]
    p = result["parameters"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    lat = result["latency_ms"]["delta_to_socket"]
    fig.suptitle(
        f"swarmdesk widget: {p['idle']} idle sockets + {p['rate']:g} msg/s for "
        f"{p['duration_s']:g} s; delta to socket p50 {lat['p50']} ms, p99 {lat['p99']} ms; "
        f"service RSS peak {result['memory_mb']['service_peak']} MB"
    )
    ax = axes[0]
    plots.plot_percentiles(
        ax,
        {"deltas": chats.delta_ms},
        "ms from orchestration to the visitor's socket",
        tail=0.01,
    )
    ax.legend()
    ax = axes[1]
    t0 = m["marks"]["start"]
    xs = [t - t0 for t, _ in rss.samples]
    ax.plot(xs, [row.get("service", 0) / 2**20 for _, row in rss.samples], label="service")
    ax.plot(xs, [row.get("loadgen", 0) / 2**20 for _, row in rss.samples], label="load gen")
    for key, label in (("idle_open", "idle open"), ("load_start", "load"), ("last_send", "drain")):
        ax.axvline(m["marks"][key] - t0, color="k", linestyle=":", alpha=0.6)
        ax.text(m["marks"][key] - t0, ax.get_ylim()[1] * 0.95, label, fontsize=8)
    ax.set_xlabel("s")
    ax.set_ylabel("RSS, MB")
    ax.legend()
    ax.grid(True, alpha=0.3)
    plots.save_figure(plt, fig, path)


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    p, idle, mem, lat = r["parameters"], r["idle"], r["memory_mb"], r["latency_ms"]
    c, hist = r["counts"], r["server_histogram_ms"]

    def row(label: str, s: dict[str, Any]) -> str:
        return report.latency_row(label, s, 32)

    lines = [
        "",
        f"== swarmdesk bench widget: {idle['opened']} idle sockets + {p['rate']:g} msg/s for "
        f"{p['duration_s']:g} s ({p['db']}; simulator {p['sim_first_token_ms']:g} ms first token, "
        f"{p['sim_tps']:g} tok/s, {p['reply_tokens']} tokens) ==",
        f"idle: {idle['opened']} opened in {idle['connect_s']:g} s, {idle['failed']} failed, "
        f"{idle['alive_at_end']} still open at the end",
        f"service RSS: {mem['service_before_idle']:g} MB before, {mem['service_with_idle']:g} "
        f"MB with the idle sockets ({mem['idle_connection_kb']:g} KB each), peak "
        f"{mem['service_peak']:g} MB",
        f"messages: sent {c['sent']} ({r['rate_sent']:g}/s), answered {c['answered']}, "
        f"unanswered {c['unanswered']}, duplicate finals {c.get('duplicate_finals', 0)}, "
        f"deltas {c.get('deltas', 0)} over {c['active_connections']} active connections "
        f"(messages queued behind a busy visitor: {c.get('queued_behind_busy_visitor', 0)})",
        "",
        report.latency_header("latency, ms", 32),
        row("delta: orchestration -> socket", lat["delta_to_socket"]),
        row("first delta after send", lat["first_delta_from_send"]),
        row("final after send", lat["final_from_send"]),
        f"service's own histogram (to the socket write): p50 <= {hist['p50_bucket']} ms, "
        f"p99 <= {hist['p99_bucket']} ms",
        f"other processes on the machine: {r['cpu']['other_processes_cores']:.2f} cores during "
        "the load (over 0.25: expect noisy latencies)",
        "cpu, share of a core: "
        + ", ".join(
            f"{k.removesuffix('_core_share')} {v:.0%}"
            for k, v in r["cpu"].items()
            if k.endswith("_core_share")
        ),
    ]
    log = r["service_log"]
    if log["counts"]:
        lines.append("service log: " + report.log_counts(log))
    return "\n".join(lines + report.summary_tail(r, files))
