"""Scenario `scale`: the same HTTP API load against one process on the embedded defaults, one
process in the distributed mode (Redis queue + PostgreSQL) and two such processes.

Each setup gets its own simulator, database (and Redis key prefix) and service processes. Two
processes listen on two ports; conversations are spread over them (as a load balancer that
keeps a shopper's requests on one replica would), and the answer may be written by either
process: the queue's partitions decide, the bus carries the deltas to the stream.

Per setup: answered messages/s, first delta and final latency, CPU-ms per answered message
(service processes; Redis and PostgreSQL beside them), and the cores each process got (CPU
seconds / wall seconds). `--saturate` raises the rate step by step per setup and reports the
highest rate each one kept up with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import (
    api_load,
    api_service,
    options,
    plots,
    processes,
    prometheus,
    result_files,
    sampling,
    simulator_http,
    stats,
)
from bench.arrivals import arrival_offsets
from bench.http_client import http_client
from cluster.redis import delete_prefix

NAME = "scale"
HELP = "1 process (memory) vs 1 and 2 processes (redis + PostgreSQL): throughput, latency, CPU"

REDIS_URL = "redis://127.0.0.1:6379/0"
QUEUE_PARTITIONS = 32  # queue.partitions of the distributed setups (the service's default)
SERVE = (sys.executable, "-m", "bot.cli", "--config")
# Targets of the scale-out issue.
TARGET_REDIS_CPU_RATIO = 1.15  # redis/PG CPU per message <= 1.15 x memory's
TARGET_TWO_PROCS_RATIO = 1.3  # 2 processes answer >= 1.3 x what 1 does at saturation
TARGET_TWO_PROCS_PER_CORE = 0.85  # ... or per core used >= 0.85 x


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    db: str  # sqlite | postgres
    backend: str  # memory | redis
    processes: int


SETUPS = {
    s.name: s
    for s in (
        Setup("memory-sqlite", "sqlite", "memory", 1),
        Setup("memory-pg", "postgres", "memory", 1),
        Setup("redis-pg", "postgres", "redis", 1),
        Setup("redis-pg-x2", "postgres", "redis", 2),
    )
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=50.0, help="messages per second (same load)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per setup")
    p.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help=f"comma-separated, of: {', '.join(SETUPS)}",
    )
    p.add_argument(
        "--saturate",
        action="store_true",
        help="instead of one rate: from --rate up by --step-factor per step (each "
        "--step-duration s) until a setup stops keeping up; reports the highest kept rate",
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the setups at the same time, each with its own load, measured in one "
        "window: the machine's other load weighs on all alike (for comparing CPU per "
        "message on a busy machine; not with --saturate)",
    )
    p.add_argument("--step-factor", type=float, default=1.25)
    p.add_argument("--step-duration", type=float, default=12.0)
    p.add_argument("--max-steps", type=int, default=10)
    options.add_simulator_arguments(p)
    p.add_argument(
        "--pg-admin-dsn",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="where to CREATE/DROP the throw-away databases",
    )
    p.add_argument("--redis-url", default=REDIS_URL, help="Redis of the distributed setups")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20, help="unmeasured messages per setup")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="wait for late answers")
    p.add_argument(
        "--provider-max-concurrency",
        type=int,
        default=1024,
        help="model calls in flight per process (the default 32 would cap the rate)",
    )
    options.add_output_arguments(p)
    options.add_workspace_arguments(p, wait_quiet=0.0)


# --- one setup ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _redis_prefix(url: str) -> AsyncIterator[str]:
    """A fresh key prefix, its keys deleted afterwards."""
    prefix = f"bench-{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        await delete_prefix(url, prefix)


def _server_processes(name: str, among: str = "") -> list[psutil.Process]:
    """The machine's processes called `name` whose command line has `among` (PostgreSQL
    shows each connection's database there: only this run's backends count)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if (p.info["name"] or "").startswith(name) and among in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


def _cpu_total(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += sampling.cpu_seconds(p)
    return total


@dataclass
class Running:
    setup: Setup
    sim: processes.ManagedProcess
    services: list[processes.ManagedProcess]
    config: Path
    database: str  # PostgreSQL's database name; "" for SQLite


def _service(ws: processes.Workspace, index: int) -> processes.ManagedProcess:
    port = ws.free_port()
    return ws.process(
        f"service-{index}",
        [*SERVE, str(ws.config_path), "serve", "--port", str(port)],
        port=port,
        env=processes.clean_env({"SWARMDESK_API_KEY": api_service.API_KEY}),
        ready_path="/readyz",
        stop_grace_s=processes.SERVICE_STOP_GRACE_S,
    )


async def _run_setup(
    args: argparse.Namespace, setup: Setup, together: asyncio.Barrier | None = None
) -> dict[str, Any]:
    print(f"bench: setup {setup.name}")
    with processes.Workspace(f"bench-scale-{setup.name}-", keep=args.keep_tmp) as ws:
        sim = ws.simulator(options.simulator_options(args))
        services = [_service(ws, i) for i in range(setup.processes)]
        async with contextlib.AsyncExitStack() as stack:
            extra = None
            if setup.backend == "redis":
                # Entered first, left last: the keys go once the processes stopped.
                prefix = await stack.enter_async_context(_redis_prefix(args.redis_url))
                extra = {
                    "backend": "redis",
                    "url": args.redis_url,
                    "key_prefix": prefix,
                    "partitions": QUEUE_PARTITIONS,
                }
            db_url = await stack.enter_async_context(ws.database(setup.db, args.pg_admin_dsn))
            api_service.service_config(
                ws.config_path,
                port=services[0].port,
                db_url=db_url,
                sim_port=sim.port,
                max_concurrency=args.provider_max_concurrency,
                orchestration="single",
                overrides=None,
            )
            if extra is not None:
                _add_queue_section(ws.config_path, extra)
            sim.start()
            # The first process migrates the database; the others start once it is ready.
            services[0].start()
            async with http_client(sock_read_s=60) as http:
                await processes.wait_all_ready(http, sim, services[0])
                for svc in services[1:]:
                    svc.start()
                await processes.wait_all_ready(http, *services[1:])
                if setup.backend == "redis":
                    await _wait_partitions_split(http, services)
                database = db_url.rsplit("/", 1)[1] if setup.db == "postgres" else ""
                run = Running(setup, sim, services, ws.config_path, database)
                steps = await _steps(args, http, run, together)
        exit_codes = [svc.popen.returncode if svc.popen else None for svc in services]
    return {"setup": setup.name, **_describe(setup), "steps": steps, "exit_codes": exit_codes}


PARTITIONS_HELD = "swarmdesk_work_partitions_held"


async def _wait_partitions_split(
    http: aiohttp.ClientSession, services: list[processes.ManagedProcess], timeout_s: float = 60
) -> None:
    """Until every process holds its share of the work partitions: a process that joins
    takes its share over the first seconds, and the load should not start mid-handover."""
    deadline = time.monotonic() + timeout_s
    held: list[float] = []
    while time.monotonic() < deadline:
        held = [
            (await prometheus.service_metrics(http, svc.url)).get(PARTITIONS_HELD, 0.0)
            for svc in services
        ]
        if sum(held) >= QUEUE_PARTITIONS and min(held) >= QUEUE_PARTITIONS // len(services):
            return
        await asyncio.sleep(0.5)
    print(f"bench: WARNING the processes did not split the work partitions: {held}")


def _add_queue_section(config: Path, queue: dict[str, Any]) -> None:
    import yaml

    data = yaml.safe_load(config.read_text("utf-8"))
    data["queue"] = queue
    config.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")


def _describe(setup: Setup) -> dict[str, Any]:
    return {"db": setup.db, "backend": setup.backend, "processes": setup.processes}


async def _steps(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    run: Running,
    together: asyncio.Barrier | None = None,
) -> list[dict[str, Any]]:
    texts = api_service.degraded_texts(run.config, run.services[0].env)
    loads = [
        api_load.ApiLoad(
            http,
            svc.url,
            max_conversations=None,
            seed=args.seed + i,
            degraded_texts=texts,
        )
        for i, svc in enumerate(run.services)
    ]
    for load in loads:
        await load.warmup(max(1, args.warmup // len(loads)))
    rate = float(args.rate)
    out: list[dict[str, Any]] = []
    steps = args.max_steps if args.saturate else 1
    duration = args.step_duration if args.saturate else args.duration
    for _ in range(steps):
        if together is not None:
            await together.wait()  # (side by side: every setup warmed up, all start at once)
        step = await _measure(args, http, run, loads, rate, duration)
        out.append(step)
        print(_step_line(run.setup, step))
        if args.saturate and not step["kept_up"]:
            break
        rate = round(rate * args.step_factor, 1)
    for load in loads:
        await load.close()
    return out


async def _measure(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    run: Running,
    loads: list[api_load.ApiLoad],
    rate: float,
    duration: float,
) -> dict[str, Any]:
    procs: dict[str, psutil.Process] = {svc.name: psutil.Process(svc.pid) for svc in run.services}
    procs["simulator"] = psutil.Process(run.sim.pid)
    procs["loadgen"] = psutil.Process()
    # Redis is the machine's shared server (other users' load counts too); PostgreSQL only
    # this run's connections (its shared background workers are left out).
    servers = {"redis": _server_processes("redis-server")}
    if run.database:
        servers["postgres"] = _server_processes("postgres", f" {run.database} ")
    server_cpu0 = {k: _cpu_total(v) for k, v in servers.items()}
    other = await sampling.wait_quiet(list(procs.values()), args.wait_quiet)
    if other >= 0.25:
        print(f"bench: WARNING other processes keep {other:.2f} cores busy: noisy figures")
    sim0 = await simulator_http.simulator_stats(http, run.sim.url)
    marks = [len(load.msgs) for load in loads]
    window = sampling.CpuWindow(procs)
    offsets = arrival_offsets(random.Random(args.seed), rate, "poisson", duration)
    start = time.perf_counter()
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        load = loads[i % len(loads)]
        msg = api_load.Msg(index=len(load.msgs), warmup=False, scheduled=start + offset)
        load.msgs.append(msg)
        load.send(msg)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(load.all_settled.wait() for load in loads)), args.drain_timeout
        )
    end = time.perf_counter()
    cpu = window.stop()
    server_cpu = {k: _cpu_total(v) - server_cpu0[k] for k, v in servers.items()}
    sim1 = await simulator_http.simulator_stats(http, run.sim.url)
    msgs = [m for load, mark in zip(loads, marks, strict=True) for m in load.msgs[mark:]]
    return _step_result(rate, duration, start, end, msgs, cpu, server_cpu, window, sim0, sim1)


def _step_result(
    rate: float,
    duration: float,
    start: float,
    end: float,
    msgs: list[api_load.Msg],
    cpu: dict[str, float],
    server_cpu: dict[str, float],
    window: sampling.CpuWindow,
    sim0: dict[str, Any],
    sim1: dict[str, Any],
) -> dict[str, Any]:
    answered = [m for m in msgs if m.final is not None]
    first_ms = [x for x in (m.ms(m.first_delta) for m in answered) if x is not None]
    final_ms = [x for x in (m.ms(m.final) for m in answered) if x is not None]
    wall = end - start
    service_s = sum(v for k, v in cpu.items() if k.startswith("service"))
    shifted = api_load.finals_shifted(answered, start, duration)
    unanswered = len(msgs) - len(answered)
    final = stats.summarize(final_ms)
    duplicates = sum(1 for m in msgs if len(m.final_seqs) > 1)
    kept_up = (
        unanswered == 0
        and shifted >= 0.95 * len(msgs)
        and (final["p99"] or math.inf) <= 1000 * REPLY_SLACK_S + (final["p50"] or 0)
    )
    requests = sim1.get("requests", 0) - sim0.get("requests", 0)
    return {
        "rate": rate,
        "duration_s": duration,
        "sent": len(msgs),
        "answered": len(answered),
        "unanswered": unanswered,
        "duplicates": duplicates,
        "degraded": sum(1 for m in answered if m.degraded),
        "errors": sum(1 for m in msgs if m.error),
        "answered_per_s": round(shifted / duration, 2),
        "kept_up": kept_up,
        "model_calls_per_message": round(requests / len(msgs), 3) if msgs else None,
        "latency_ms": {"first_delta": stats.summarize(first_ms), "final": final},
        "cpu": {
            "window_s": round(wall, 2),
            "service_ms_per_answered": round(service_s / len(answered) * 1000, 2)
            if answered
            else None,
            "with_servers_ms_per_answered": round(
                (service_s + sum(server_cpu.values())) / len(answered) * 1000, 2
            )
            if answered
            else None,
            "cores": {k: round(v / wall, 3) for k, v in {**cpu, **server_cpu}.items()},
            "machine_busy_cores": round(window.machine_busy_s / wall, 3),
            "other_cores": round(
                max(0.0, window.machine_busy_s - sum(cpu.values()) - sum(server_cpu.values()))
                / wall,
                3,
            ),
        },
        "_first_ms": first_ms,
        "_final_ms": final_ms,
    }


# A setup keeps up while its p99 final stays within this of its p50 (a backlog grows past it;
# less would count the noise of a shared machine as saturation).
REPLY_SLACK_S = 2.0


def _step_line(setup: Setup, s: dict[str, Any]) -> str:
    lat, cpu = s["latency_ms"], s["cpu"]
    cores = ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items())
    cores += f"; other processes {cpu['other_cores']:.2f}"
    return (
        f"  {setup.name:<14} {s['rate']:>6g}/s sent {s['sent']:>5} answered {s['answered']:>5} "
        f"({s['answered_per_s']:g}/s{'' if s['kept_up'] else ', NOT kept up'}) first delta "
        f"p50/p99 {lat['first_delta']['p50']}/{lat['first_delta']['p99']} ms, final "
        f"{lat['final']['p50']}/{lat['final']['p99']} ms, {cpu['service_ms_per_answered']} "
        f"CPU-ms/msg; cores: {cores}"
    )


# --- the run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        raise SystemExit(f"bench: unknown setup(s) {unknown}; choose from {', '.join(SETUPS)}")
    if args.side_by_side:
        if args.saturate:
            raise SystemExit("bench: --side-by-side measures one rate; leave out --saturate")
        together = asyncio.Barrier(len(names))
        results = list(
            await asyncio.gather(*(_run_setup(args, SETUPS[n], together) for n in names))
        )
    else:
        results = [await _run_setup(args, SETUPS[n]) for n in names]
    result = _result(args, results)
    mode = "sat" if args.saturate else f"r{args.rate:g}"
    stem = f"scale-{mode}{('-' + args.tag) if args.tag else ''}"
    return result_files.publish(args.out, stem, result, lambda png: _plot(results, png), _summary)


def _best(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The step at the highest rate the setup kept up with (else its first)."""
    kept = [s for s in steps if s["kept_up"]]
    return kept[-1] if kept else steps[0]


def _result(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["setup"]: r for r in results}
    comparison: dict[str, Any] = {}

    def cpu_of(name: str) -> float | None:
        if name not in by:
            return None
        # At the first step: the same rate for every setup (CPU per message falls as the
        # rate rises: more work per wake-up).
        value = by[name]["steps"][0]["cpu"]["service_ms_per_answered"]
        return float(value) if value is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    comparison["cpu_per_message_redis_pg_vs_memory_sqlite"] = ratio(
        cpu_of("redis-pg"), cpu_of("memory-sqlite")
    )
    comparison["cpu_per_message_redis_pg_vs_memory_pg"] = ratio(
        cpu_of("redis-pg"), cpu_of("memory-pg")
    )
    comparison["cpu_per_message_memory_pg_vs_memory_sqlite"] = ratio(
        cpu_of("memory-pg"), cpu_of("memory-sqlite")
    )
    if "redis-pg" in by and "redis-pg-x2" in by:
        one, two = _best(by["redis-pg"]["steps"]), _best(by["redis-pg-x2"]["steps"])
        comparison["answered_per_s_two_vs_one"] = ratio(
            two["answered_per_s"], one["answered_per_s"]
        )
        cores_one = sum(v for k, v in one["cpu"]["cores"].items() if k.startswith("service"))
        cores_two = sum(v for k, v in two["cpu"]["cores"].items() if k.startswith("service"))
        comparison["answered_per_service_core_two_vs_one"] = ratio(
            two["answered_per_s"] / cores_two if cores_two else None,
            one["answered_per_s"] / cores_one if cores_one else None,
        )
    problems = [
        f"{r['setup']} at {s['rate']:g}/s: {s['duplicates']} duplicate answers"
        for r in results
        for s in r["steps"]
        if s["duplicates"]
    ]
    if not args.saturate:
        problems += [
            f"{r['setup']}: {s['unanswered']} unanswered"
            for r in results
            for s in r["steps"]
            if s["unanswered"]
        ]
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "saturate": args.saturate,
            "side_by_side": args.side_by_side,
            "step_factor": args.step_factor,
            "step_duration_s": args.step_duration,
            "sim_first_token_ms": args.sim_first_token_ms,
            "sim_tps": args.sim_tps,
            "reply_tokens": args.reply_tokens,
            "provider_max_concurrency": args.provider_max_concurrency,
            "seed": args.seed,
        },
        "environment": result_files.environment(),
        "setups": [
            {
                **r,
                "steps": [
                    {k: v for k, v in s.items() if not k.startswith("_")} for s in r["steps"]
                ],
            }
            for r in results
        ],
        "comparison": comparison,
        "targets": {
            "cpu_per_message_redis_vs_memory_max": TARGET_REDIS_CPU_RATIO,
            "two_vs_one_at_saturation_min": TARGET_TWO_PROCS_RATIO,
            "two_vs_one_per_core_min": TARGET_TWO_PROCS_PER_CORE,
        },
        "ok": not problems,
        "problems": problems,
    }


def _plot(results: list[dict[str, Any]], png: Path) -> None:
    plt = plots.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    plots.plot_percentiles(
        ax1,
        {r["setup"]: _best(r["steps"])["_final_ms"] for r in results},
        "final answer, ms after POST",
    )
    ax1.set_title("final answer latency (highest kept-up rate)")
    ax1.legend(fontsize=8)
    for r in results:
        xs = [s["rate"] for s in r["steps"]]
        ax2.plot(xs, [s["answered_per_s"] for s in r["steps"]], marker="o", label=r["setup"])
    ax2.set_xlabel("messages/s sent")
    ax2.set_ylabel("answered/s")
    ax2.set_title("throughput")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    plots.save_figure(plt, fig, png)


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    mode = "saturation" if r["parameters"]["saturate"] else "same load"
    if r["parameters"].get("side_by_side"):
        mode += ", setups side by side"
    lines = [f"scale: {mode}"]
    for s in r["setups"]:
        best = _best(s["steps"])
        lat, cpu = best["latency_ms"], best["cpu"]
        lines.append(
            f"  {s['setup']:<14} {best['answered_per_s']:>7g} answered/s at {best['rate']:g}/s; "
            f"first delta p50/p99 {lat['first_delta']['p50']}/{lat['first_delta']['p99']} ms; "
            f"final {lat['final']['p50']}/{lat['final']['p99']} ms; "
            f"{cpu['service_ms_per_answered']} CPU-ms/msg "
            f"({cpu['with_servers_ms_per_answered']} with Redis + PostgreSQL); cores "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items())
        )
    lines.append(f"comparison: {r['comparison']}")
    if r["problems"]:
        lines.append("PROBLEMS: " + "; ".join(r["problems"]))
    lines.append("results: " + ", ".join(str(f) for f in files))
    return "\n".join(lines)
