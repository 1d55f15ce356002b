"""Scenario `telegram`: many private chats posting Updates to the Telegram webhook.

Processes: the model simulator, the service (one bot, webhook mode, SQLite, one specialist
and no LLM routing, so one model call per answer) and the fake Bot API server
(`python -m simulator.fakes.telegram_api`), each its own process; this process only posts Updates.
The fake records every Bot API call with its arrival time (time.monotonic, the same clock in
every process on Linux), so after the load each chat's calls tell what its shopper saw:

- first visible text: the first `sendMessageDraft` (or `sendMessage`) that reached Telegram;
- final: the `sendMessage` with the answer;
- Bot API calls per answer: every call to the chat from its Update to the final (typing,
  drafts, the final, and any 429 answered by the fake).

Each Update is a new message from a new private chat (`--groups 0.2` sends that share as
@mentions in new groups instead, which stream by editing a message). The simulator baseline
(direct streamed calls, like scenario `api`) is what the model alone takes to its first token:
first visible text minus that baseline is what the service adds.

    .venv/bin/python -m bench telegram --rate 100 --duration 20
    .venv/bin/python -m bench telegram --rate 20 --duration 20 --reply-tokens 300
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import (
    options,
    plots,
    processes,
    prometheus,
    report,
    result_files,
    sampling,
    simulator_http,
    stats,
)
from bench.arrivals import arrival_offsets
from bench.http_client import http_client
from bench.questions import QUESTIONS
from bench.service_code import REPO_ROOT
from bench.service_config import base_service_config, one_specialist_sections, write_yaml
from bench.service_log import scan_json_log

NAME = "telegram"
HELP = (
    "Telegram webhook load over many private chats against the fake Bot API: updates/s, time "
    "to first visible text and to the final message, Bot API calls per answer"
)

TOKEN = "424242:BENCH-token"
SECRET = "bench-secret"
PATH = "/telegram/bench/webhook"
BOT_ID = 424242
USERNAME = "bench_shop_bot"
TARGET_OVERHEAD_P99_MS = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=100.0, help="updates per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    options.add_simulator_arguments(
        p, reply_tokens=300, reply_help="tokens per answer (300 at 50/s: 6 s)"
    )
    p.add_argument("--draft-rate", type=float, default=2.0, help="draft_updates_per_second")
    p.add_argument("--edit-interval", type=float, default=1.0, help="edit_interval_seconds")
    p.add_argument("--groups", type=float, default=0.0, help="share of updates from groups")
    p.add_argument(
        "--flood-limit",
        type=int,
        default=5,
        help="the fake's calls per second per chat before it answers 429",
    )
    p.add_argument(
        "--mode",
        choices=("full", "channel"),
        default="full",
        help="full: the whole service with the simulator; channel: the Telegram channel alone "
        "in this process with a scripted model (no storage, no orchestration)",
    )
    p.add_argument(
        "--batch-ms", type=float, default=100.0, help="--mode channel: tokens pushed per batch"
    )
    options.add_db_arguments(p)
    options.add_open_loop_arguments(p, sends="updates")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="wait for late answers")
    options.add_output_arguments(p, profile=True)
    options.add_workspace_arguments(p)


# --- the load -----------------------------------------------------------------------------


@dataclass(slots=True)
class Upd:
    index: int
    chat_id: int
    group: bool
    scheduled: float
    sent: float = 0.0  # time.monotonic() when the POST went out
    acked: float | None = None
    status: int | None = None
    error: str | None = None


class Poster:
    def __init__(
        self, http: aiohttp.ClientSession, url: str, seed: int, groups: float, first_id: int
    ) -> None:
        self.http = http
        self.url = url
        self.rng = random.Random(seed)
        self.groups = groups
        # Fresh chats and update ids per poster: the warm-up must not share any with the load.
        self.update_ids = iter(range(first_id, 10**12))
        self.private_ids = iter(range(first_id, 10**12))
        self.group_ids = iter(range(-first_id, -(10**12), -1))
        self.updates: list[Upd] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, index: int, scheduled: float) -> Upd:
        group = self.rng.random() < self.groups
        chat = next(self.group_ids) if group else next(self.private_ids)
        u = Upd(index, chat, group, scheduled)
        self.updates.append(u)
        task = asyncio.create_task(self._post(u))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return u

    def _body(self, u: Upd) -> dict[str, Any]:
        user = abs(u.chat_id) + 7
        chat: dict[str, Any] = {"id": u.chat_id, "type": "supergroup" if u.group else "private"}
        text = self.rng.choice(QUESTIONS)
        msg: dict[str, Any] = {
            "message_id": 1,
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user, "is_bot": False, "first_name": f"Shopper{user}"},
        }
        if u.group:
            handle = f"@{USERNAME}"
            msg["text"] = f"{handle} {text}"
            msg["entities"] = [{"type": "mention", "offset": 0, "length": len(handle)}]
        else:
            msg["text"] = text
        return {"update_id": next(self.update_ids), "message": msg}

    async def _post(self, u: Upd) -> None:
        body = self._body(u)
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        u.sent = time.monotonic()
        try:
            async with self.http.post(self.url, json=body, headers=headers) as r:
                u.status = r.status
                await r.read()
                if r.status != 200:
                    u.error = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            u.error = f"{type(e).__name__}: {e}"
        u.acked = time.monotonic()

    async def drive(self, rate: float, duration: float, arrival: str) -> tuple[float, float]:
        offsets = arrival_offsets(random.Random(self.rng.random()), rate, arrival, duration)
        start = time.monotonic()
        for i, offset in enumerate(offsets):
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.send(i, start + offset)
        await self.wait()
        return start, time.monotonic()

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class CallLog:
    """The fake's recorded calls, fetched incrementally."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.calls: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.finals: set[int] = set()

    async def fetch(self) -> None:
        async with self.http.get(f"{self.base}/_fake/calls?since={len(self.calls)}") as r:
            body = await r.json()
        self.calls.extend(body["calls"])
        self.violations = body["violations"]
        for c in body["calls"]:
            if c["method"] == "sendmessage" and c["status"] == 200 and c["chat_id"] is not None:
                self.finals.add(c["chat_id"])


async def drain(log: CallLog, updates: list[Upd], timeout: float, settle: float = 0.0) -> None:
    """Until every update's chat got a message (or `timeout`), then `settle` seconds more
    (a group's last edit follows its first message)."""
    end = time.monotonic() + timeout
    want = {u.chat_id for u in updates if u.status == 200}
    while time.monotonic() < end:
        await log.fetch()
        if want <= log.finals:
            break
        await asyncio.sleep(0.5)
    if settle:
        await asyncio.sleep(settle)
    await log.fetch()


# --- the run ------------------------------------------------------------------------------


def service_section(args: argparse.Namespace, api_url: str) -> dict[str, Any]:
    """The `channels.telegram` section: one bot pointed at the fake Bot API."""
    return {
        "enabled": True,
        "bots": [
            {
                "account": "bench",
                "webhook_path": PATH,
                "username": USERNAME,
                "token_env": "BENCH_TG_TOKEN",
                "secret_token_env": "BENCH_TG_SECRET",
                "api_base_url": api_url,
                "draft_updates_per_second": args.draft_rate,
                "edit_interval_seconds": args.edit_interval,
            }
        ],
    }


def service_config(
    path: Path, *, port: int, db_url: str, sim_port: int, api_url: str, args: argparse.Namespace
) -> None:
    sections = one_specialist_sections(
        sim_port,
        max_concurrency=2048,
        turn_deadline_s=60,
        specialist_timeout_s=55,
        max_output_tokens=max(800, args.reply_tokens + 50),
    )
    config: dict[str, Any] = {
        **base_service_config(port, db_url),
        **sections,
        "worker": {"max_concurrent_conversations": 4096},
        "channels": {"api": {"enabled": False}, "telegram": service_section(args, api_url)},
    }
    write_yaml(path, config)


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    tag = f"-{args.tag}" if args.tag else ""
    where = "channel" if args.mode == "channel" else args.db
    stem = f"telegram-{where}-r{args.rate:g}-t{args.reply_tokens}{tag}"
    with processes.Workspace("bench-telegram-", keep=args.keep_tmp) as ws:
        sim = ws.simulator(options.simulator_options(args))
        api_port = ws.free_port()
        fake = ws.process(
            "fake-bot-api",
            [
                *(sys.executable, "-m", "simulator.fakes.telegram_api", "--port", str(api_port)),
                *("--per-chat-per-second", str(args.flood_limit)),
            ],
            port=api_port,
            env=processes.clean_env({"PYTHONPATH": str(REPO_ROOT)}),
            cwd=REPO_ROOT,
        )
        svc = ws.service(
            env={"BENCH_TG_TOKEN": TOKEN, "BENCH_TG_SECRET": SECRET}, profile=args.profile
        )
        print(f"bench: temp dir {ws.tmp}")
        async with ws.database(args.db, args.pg_admin_dsn, "swarmdesk_bench_tg") as db_url:
            service_config(
                ws.config_path,
                port=svc.port,
                db_url=db_url,
                sim_port=sim.port,
                api_url=fake.url,
                args=args,
            )
            fake.start()
            if args.mode == "channel":
                m = await _measure_channel(args, fake)
            else:
                sim.start()
                svc.start()
                m = await _measure(args, sim, fake, svc)
            # Processes stop here (service first), then the PostgreSQL database is dropped.
        m["service_log"] = scan_json_log(svc.log_path)
        result = _result(args, m)
        return result_files.publish(
            args.out,
            stem,
            result,
            lambda png: _plot(result, m, png),
            _summary,
            profile=ws.profile_path if args.profile else None,
        )


async def _measure(
    args: argparse.Namespace,
    sim: processes.ManagedProcess,
    fake: processes.ManagedProcess,
    svc: processes.ManagedProcess,
) -> dict[str, Any]:
    async with http_client(sock_read_s=60) as http:
        await processes.wait_all_ready(http, sim, fake, svc)
        print(f"bench: simulator :{sim.port}, fake Bot API :{fake.port}, service :{svc.port}")
        baseline, baseline_failures = await simulator_http.simulator_baseline(
            http, f"{sim.url}/v1", args.baseline_requests, args.rate, QUESTIONS
        )
        procs = sampling.psutil_processes(
            {"service": svc, "simulator": sim, "fake_bot_api": fake, "loadgen": None}
        )
        m = await _load(args, http, svc.url + PATH, fake.url, procs)
        m["metrics"] = await prometheus.service_metrics(http, svc.url)
    m.update(baseline=baseline, baseline_failures=baseline_failures)
    return m


async def _measure_channel(
    args: argparse.Namespace, fake: processes.ManagedProcess
) -> dict[str, Any]:
    """--mode channel: the Telegram channel in this process with a scripted model."""
    from bench.scenarios.telegram_stub import start_channel

    os.environ["BENCH_TG_TOKEN"], os.environ["BENCH_TG_SECRET"] = TOKEN, SECRET
    section = service_section(args, fake.url)
    runner, _, base = await start_channel(
        section,
        first_token_s=args.sim_first_token_ms / 1000,
        tps=args.sim_tps,
        tokens=args.reply_tokens,
        batch_s=args.batch_ms / 1000,
    )
    try:
        async with http_client(sock_read_s=60) as http:
            await processes.wait_all_ready(http, fake)
            print(f"bench: fake Bot API :{fake.port}, Telegram channel alone at {base}")
            procs = sampling.psutil_processes({"loadgen_and_channel": None, "fake_bot_api": fake})
            m = await _load(args, http, base + PATH, fake.url, procs)
    finally:
        await runner.cleanup()
    # The scripted model's first token comes exactly this late: that is the baseline.
    m.update(baseline=[args.sim_first_token_ms], baseline_failures=0, metrics={})
    return m


async def _load(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    webhook: str,
    api_base: str,
    procs: dict[str, psutil.Process],
) -> dict[str, Any]:
    log = CallLog(http, api_base)
    if args.warmup:
        warm = Poster(http, webhook, args.seed + 1, 0.0, first_id=1_000_000)
        for i in range(args.warmup):
            warm.send(i, time.monotonic())
            await asyncio.sleep(0.05)
        await warm.wait()
        await drain(log, warm.updates, 60.0)
    skip = len(log.calls)
    if args.wait_quiet > 0:
        await sampling.wait_quiet(list(procs.values()), args.wait_quiet)
    poster = Poster(http, webhook, args.seed, args.groups, first_id=10_000_000)
    rss = sampling.RssSampler(procs)
    usage = sampling.CpuWindow(procs)
    rss.start()
    print(f"bench: posting {args.rate:g} updates/s for {args.duration:g} s ({args.arrival})")
    try:
        start, last_post = await poster.drive(args.rate, args.duration, args.arrival)
        settle = 3 * args.edit_interval if args.groups else 0.0
        await drain(log, poster.updates, args.drain_timeout, settle)
    finally:
        await rss.stop()
    end = time.monotonic()
    usage.stop()
    cpu = {**usage.cpu, "other_processes": usage.others_s}
    return {
        "updates": poster.updates,
        "calls": log.calls[skip:],
        "violations": log.violations,
        "times": {"start": start, "last_post": last_post, "end": end},
        "cpu": cpu,
        "rss": rss,
        "metrics": {},
    }


# --- results ------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    first_visible_ms: float | None
    final_ms: float | None
    calls: int
    drafts: int
    edits: int
    rejected: int  # calls the fake answered with an error (429 ...)
    min_gap_ms: float | None  # shortest time between two streamed updates of the chat


def _answers(updates: list[Upd], calls: list[dict[str, Any]]) -> dict[int, Answer]:
    by_chat: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        if c["chat_id"] is not None:
            by_chat[c["chat_id"]].append(c)
    out: dict[int, Answer] = {}
    for u in updates:
        mine = sorted(by_chat.get(u.chat_id, []), key=lambda c: c["at"])
        ok = [c for c in mine if c["status"] == 200]
        visible = [c for c in ok if c["method"] in ("sendmessagedraft", "sendmessage")]
        # Private: the sendMessage after the drafts. Group: the message's last edit.
        shown = ("sendmessage", "editmessagetext") if u.group else ("sendmessage",)
        finals = [c for c in ok if c["method"] in shown]
        final_at = finals[-1]["at"] if finals else None
        streamed = [c["at"] for c in ok if c["method"] in ("sendmessagedraft", "editmessagetext")]
        gaps = [b - a for a, b in itertools.pairwise(streamed)]
        out[u.index] = Answer(
            first_visible_ms=(visible[0]["at"] - u.sent) * 1000 if visible else None,
            final_ms=(final_at - u.sent) * 1000 if final_at is not None else None,
            calls=len(mine),
            drafts=sum(1 for c in ok if c["method"] == "sendmessagedraft"),
            edits=sum(1 for c in ok if c["method"] == "editmessagetext"),
            rejected=sum(1 for c in mine if c["status"] != 200),
            min_gap_ms=min(gaps) * 1000 if gaps else None,
        )
    return out


def _result(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    updates: list[Upd] = m["updates"]
    answers = _answers(updates, m["calls"])
    times = m["times"]
    acked = [u for u in updates if u.status == 200]
    ack_ms = [(u.acked - u.sent) * 1000 for u in acked if u.acked is not None]
    out: dict[str, Any] = {}
    for kind, group in (("private", False), ("group", True)):
        mine = [answers[u.index] for u in acked if u.group == group]
        if not mine:
            continue
        done = [a for a in mine if a.final_ms is not None]
        out[kind] = {
            "updates": len(mine),
            "answered": len(done),
            "latency_ms": {
                "first_visible": stats.summarize(
                    [a.first_visible_ms for a in done if a.first_visible_ms is not None]
                ),
                "final": stats.summarize([a.final_ms for a in done if a.final_ms is not None]),
            },
            "bot_api_calls_per_answer": stats.summarize([a.calls for a in done], 2),
            "drafts_per_answer": stats.summarize([a.drafts for a in done], 2),
            "edits_per_answer": stats.summarize([a.edits for a in done], 2),
            "rejected_calls": sum(a.rejected for a in mine),
            "min_gap_between_streamed_updates_ms": min(
                (a.min_gap_ms for a in done if a.min_gap_ms is not None), default=None
            ),
        }
    baseline = stats.summarize(m["baseline"])
    first = out.get("private", {}).get("latency_ms", {}).get("first_visible", {})
    overhead = stats.overhead_ms(first, baseline)
    window = args.duration
    cpu, rss = m["cpu"], m["rss"]
    wall = times["end"] - times["start"]
    problems: list[str] = []
    errors = [u for u in updates if u.status != 200]
    if errors:
        problems.append(f"{len(errors)} updates not acknowledged with 200")
    for kind, x in out.items():
        if x["answered"] < x["updates"]:
            problems.append(f"{x['updates'] - x['answered']} {kind} updates unanswered")
    if m["violations"]:
        problems.append(f"{len(m['violations'])} calls during a 429 pause")
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "sim_first_token_ms": args.sim_first_token_ms,
            "sim_tps": args.sim_tps,
            "reply_tokens": args.reply_tokens,
            "draft_updates_per_second": args.draft_rate,
            "edit_interval_seconds": args.edit_interval,
            "groups": args.groups,
            "flood_limit_per_chat_per_second": args.flood_limit,
            "mode": args.mode,
            "db": args.db if args.mode == "full" else None,
            "arrival": args.arrival,
            "seed": args.seed,
            "tag": args.tag,
        },
        "environment": result_files.environment(),
        "updates_sent": len(updates),
        "updates_per_s_sent": round(len(updates) / window, 2),
        "updates_acked": len(acked),
        "webhook_response_ms": stats.summarize(ack_ms),
        "chats": out,
        "simulator_baseline_ms": {"first_token": baseline, "failures": m["baseline_failures"]},
        "service_overhead_first_visible_ms": overhead,
        "target": {
            "p99_first_visible_overhead_ms_max": TARGET_OVERHEAD_P99_MS,
            "met": overhead["p99"] is not None and overhead["p99"] <= TARGET_OVERHEAD_P99_MS,
        },
        "cpu": {
            "window_s": round(wall, 2),
            **{f"{n}_core_share": round(v / wall, 3) for n, v in cpu.items()},
        },
        "memory_mb": {f"{n}_peak_rss": rss.peak_mb(n) for n in cpu if n in rss.procs},
        "violations": m["violations"][:20],
        "service_metrics": {
            k: v for k, v in m["metrics"].items() if "telegram" in k or "replies" in k
        },
        "service_log": m["service_log"],
        "ok": not problems,
        "problems": problems,
    }


def _plot(result: dict[str, Any], m: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    answers = _answers(m["updates"], m["calls"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    series = {
        "simulator first token (direct)": m["baseline"],
        "first visible text": [
            a.first_visible_ms for a in answers.values() if a.first_visible_ms is not None
        ],
        "final message": [a.final_ms for a in answers.values() if a.final_ms is not None],
    }
    plots.plot_percentiles(ax, series, "ms after the Update was posted")
    ax.set_title("latency by percentile")
    ax.legend(fontsize=8)
    ax = axes[1]
    calls = [a.calls for a in answers.values() if a.final_ms is not None]
    if calls:
        ax.hist(calls, bins=range(min(calls), max(calls) + 2), align="left")
    ax.set_xlabel("Bot API calls per answer")
    ax.set_ylabel("answers")
    ax.set_title("Bot API calls per answer")
    p = result["parameters"]
    fig.suptitle(
        f"swarmdesk telegram: {p['rate']:g} updates/s for {p['duration_s']:g} s; sim "
        f"{p['sim_first_token_ms']:g} ms + {p['reply_tokens']} tokens at {p['sim_tps']:g}/s; "
        f"drafts {p['draft_updates_per_second']:g}/s"
    )
    plots.save_figure(plt, fig, path)


def _row(label: str, s: dict[str, Any]) -> str:
    return report.latency_row(label, s, 34)


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    p = r["parameters"]
    alone = p["mode"] == "channel"
    secs = p["sim_first_token_ms"] / 1000 + p["reply_tokens"] / p["sim_tps"]
    what = "the Telegram channel alone, scripted model, no storage" if alone else p["db"]
    lines = [
        "",
        f"== swarmdesk bench telegram: {p['rate']:g} updates/s requested for "
        f"{p['duration_s']:g} s ({p['arrival']}), {what}, groups {p['groups']:.0%} ==",
        f"model: {p['sim_first_token_ms']:g} ms to first token, {p['reply_tokens']} tokens at "
        f"{p['sim_tps']:g}/s (~{secs:.1f} s answers); drafts <= "
        f"{p['draft_updates_per_second']:g}/s, edits every >= {p['edit_interval_seconds']:g} s",
        f"updates sent {r['updates_sent']} ({r['updates_per_s_sent']:g}/s), acknowledged "
        f"{r['updates_acked']}",
        "",
        report.latency_header("latency, ms from the Update posted", 34),
        _row("webhook 200", r["webhook_response_ms"]),
    ]
    for kind, x in r["chats"].items():
        lines.append(_row(f"{kind}: first visible text", x["latency_ms"]["first_visible"]))
        lines.append(_row(f"{kind}: final message", x["latency_ms"]["final"]))
    base = "model first token (scripted)" if alone else "simulator first token (direct)"
    lines.append(_row(base, r["simulator_baseline_ms"]["first_token"]))
    lines.append("")
    for kind, x in r["chats"].items():
        c, d, e = x["bot_api_calls_per_answer"], x["drafts_per_answer"], x["edits_per_answer"]
        gap = x["min_gap_between_streamed_updates_ms"]
        lines.append(
            f"{kind}: answered {x['answered']}/{x['updates']}; Bot API calls per answer mean "
            f"{c['mean']}, p99 {c['p99']}, max {c['max']} (drafts mean {d['mean']}, edits "
            f"mean {e['mean']}); shortest gap between streamed updates of one chat "
            f"{report.fmt_ms(gap)} ms; calls refused by the fake {x['rejected_calls']}"
        )
    over, target = r["service_overhead_first_visible_ms"], r["target"]
    lines.append(
        f"{'channel' if alone else 'service'} overhead at first visible text: p50 "
        f"{report.fmt_ms(over['p50'])} ms, p99 "
        f"{report.fmt_ms(over['p99'])} ms (target p99 <= "
        f"{target['p99_first_visible_overhead_ms_max']:g} ms: "
        f"{'met' if target['met'] else 'NOT met'})"
    )
    cpu, mem = r["cpu"], r["memory_mb"]
    lines.append(
        "CPU (share of one core): "
        + ", ".join(
            f"{k.removesuffix('_core_share')} {v:.0%}" for k, v in cpu.items() if k != "window_s"
        )
        + "; RSS peak "
        + ", ".join(f"{k.removesuffix('_peak_rss')} {v:g} MB" for k, v in mem.items())
    )
    log = r["service_log"]
    if log["counts"]:
        lines.append("service log: " + report.log_counts(log))
    return "\n".join(lines + report.summary_tail(r, files))
