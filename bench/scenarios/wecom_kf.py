"""Scenario `wecom_kf`: WeChat Customer Service (微信客服) callbacks at N/s, pulls, answers.

A fake WeCom KF API runs in this process (simulator/fakes/wecom_kf_api.py). For each message
a new customer writes a question (queued for `kf/sync_msg`) and WeCom's side posts the
encrypted `kf_msg_or_event` callback to the service, at `--rate` per second. The service
acknowledges, pulls the account's new messages from its stored cursor, answers each with
the model (the simulator) and sends it with `kf/send_msg`.

Reported: answered messages per second, the time from the callback to the first
`send_msg` a customer receives, API calls per answer (sync_msg pages, send_msg, profile
lookups, tokens), pulls per callback, and whether every customer got their stored answer
exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import options, plots, processes, report, result_files, sampling, stats
from bench.http_client import http_client
from bench.service_config import base_service_config, one_specialist_sections, write_yaml
from bench.service_log import scan_json_log
from simulator.fakes.wecom_kf_api import FakeKfApi, KfCallbackClient

NAME = "wecom_kf"
HELP = (
    "WeChat Customer Service load: kf_msg_or_event callbacks at N/s, sync_msg pulls, "
    "send_msg answers; messages/s, callback-to-first-send, API calls per answer"
)

CORP = "ww_bench"
SECRET = "bench-kf-secret"
TOKEN = "bench-kf-token"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
KFID = "wk_bench"
PATH = "/wecom/kf"
QUESTIONS = (
    "这件羊毛大衣怎么保养？",
    "这款耳机音质怎么样？",
    "这个保温杯能装热牛奶吗？",
    "这双跑鞋偏大还是偏小？",
    "What material is this jacket made of?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=20.0, help="customer messages per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--model-ms", type=float, default=300, help="simulated first-token delay")
    p.add_argument("--tokens", type=int, default=40, help="tokens per answer (at 50/s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--drain-timeout", type=float, default=40.0, help="wait for late answers")
    options.add_output_arguments(p)
    options.add_workspace_arguments(p, wait_quiet=None)


def service_config(path: Path, *, port: int, db_url: str, sim_port: int, api_url: str) -> None:
    sections = one_specialist_sections(
        sim_port, max_concurrency=512, turn_deadline_s=30, specialist_timeout_s=25
    )
    config: dict[str, Any] = {
        **base_service_config(port, db_url),
        **sections,
        "worker": {"max_concurrent_conversations": 1024},
        "channels": {
            "wecom_kf": {
                "enabled": True,
                "corp_id": CORP,
                "secret_env": "BENCH_KF_SECRET",
                "token": TOKEN,
                "aes_key_env": "BENCH_KF_AES_KEY",
                "path": PATH,
                "api_base_url": api_url,
                "accounts": [{"name": "bench", "open_kfid": KFID}],
            }
        },
    }
    write_yaml(path, config)


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    stem = f"wecom_kf-r{args.rate:g}{('-' + args.tag) if args.tag else ''}"
    api = FakeKfApi(CORP, SECRET)
    api_url = await api.start()
    try:
        with processes.Workspace("bench-wecom-kf-", keep=args.keep_tmp) as ws:
            sim = ws.simulator()
            env = {"BENCH_KF_SECRET": SECRET, "BENCH_KF_AES_KEY": AES_KEY}
            svc = ws.service(env=env)
            print(f"bench: temp dir {ws.tmp}; fake WeCom KF API {api_url}")
            service_config(
                ws.config_path,
                port=svc.port,
                db_url=f"sqlite+aiosqlite:///{ws.sqlite_path}",
                sim_port=sim.port,
                api_url=api_url,
            )
            sim.start()
            svc.start()
            load = await _load(args, api, sim, svc)
            ws.stop()  # the stored answers are complete once the service has stopped
            stored = _stored_answers(ws.sqlite_path)
            result = _result(args, api, load, stored)
            result["service_log"] = scan_json_log(svc.log_path)
            return result_files.publish(
                args.out, stem, result, lambda png: _plot(result, png), _summary
            )
    finally:
        await api.stop()


async def _load(
    args: argparse.Namespace,
    api: FakeKfApi,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    suffix = f" [[sim:delay_ms={args.model_ms:g}]] [[sim:tps=50]] [[sim:tokens={args.tokens}]]"
    async with http_client() as ready_http:
        await processes.wait_all_ready(ready_http, sim, svc)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10, limits=limits) as http:
        wecom = KfCallbackClient(http, PATH, TOKEN, AES_KEY, CORP)
        # Warm-up: the access token, connections, the first pull.
        api.customer_writes(KFID, "wm_warmup", rng.choice(QUESTIONS) + suffix)
        await wecom.notify(KFID)
        await _quiet(api, 15.0)
        calls_before = sum(api.calls.values())
        by_call_before = dict(api.calls)
        callback_at: dict[str, float] = {}
        callback_ms: list[float] = []
        refused = 0
        proc = psutil.Process(svc.pid)
        cpu0 = sampling.cpu_seconds(proc)

        async def one(user: str) -> None:
            nonlocal refused
            api.customer_writes(KFID, user, rng.choice(QUESTIONS) + suffix)
            started = time.monotonic()
            callback_at[user] = started
            try:
                r = await wecom.notify(KFID)
            except httpx.HTTPError:
                refused += 1  # WeCom would retry; the next callback or pull covers it
                return
            callback_ms.append((time.monotonic() - started) * 1000)
            if r.status_code != 200:
                refused += 1

        start = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for i in range(int(args.rate * args.duration)):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            user = f"wm_{i}_{secrets.token_hex(3)}"
            tasks.append(asyncio.create_task(one(user)))
        await asyncio.gather(*tasks)
        sent_until = time.monotonic()
        await _quiet(api, args.drain_timeout)
        end = max((s.at for s in api.sent), default=sent_until)
        return {
            "callback_at": callback_at,
            "callback_ms": callback_ms,
            "refused": refused,
            "start": start,
            "end": end,
            "cpu_s": sampling.cpu_seconds(proc) - cpu0,
            "calls": sum(api.calls.values()) - calls_before,
            "by_call": {k: v - by_call_before.get(k, 0) for k, v in api.calls.items()},
        }


async def _quiet(api: FakeKfApi, limit: float) -> None:
    """Until no send_msg happened for 1.5 s (after at least one)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        last = max((s.at for s in api.sent), default=0.0)
        if last and time.monotonic() - last > 1.5:
            return
        await asyncio.sleep(0.25)
    print(f"bench: still answering after {limit:g} s of drain; counting what arrived")


def _stored_answers(db: Path) -> dict[str, list[str]]:
    """Customer -> the bot answers stored for them."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT c.chat_id, o.text || CASE o.status WHEN 'sent' THEN '' ELSE "
            "' [' || o.status || ']' END FROM messages o JOIN conversations c "
            "ON c.id = o.conversation_id WHERE o.sender = 'bot' AND c.channel = 'wecom_kf' "
            "ORDER BY o.id"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[str]] = {}
    for user, text in rows:
        out.setdefault(str(user), []).append(str(text))
    return out


def _result(
    args: argparse.Namespace, api: FakeKfApi, load: dict[str, Any], stored: dict[str, list[str]]
) -> dict[str, Any]:
    callback_at: dict[str, float] = load["callback_at"]
    first_send_ms: list[float] = []
    answered = duplicates = missing = 0
    for user, at in callback_at.items():
        answers = stored.get(user, [])
        got = api.joined(user)
        if len(answers) == 1 and got == answers[0] and user in api.first_send_at:
            answered += 1
            first_send_ms.append((api.first_send_at[user] - at) * 1000)
        elif answers and len(got) > len(answers[0]):
            duplicates += 1
        else:
            missing += 1
    wall = max(load["end"] - load["start"], 1e-9)
    by_call = load["by_call"]
    per_answer = {k: round(v / answered, 3) for k, v in sorted(by_call.items()) if answered}
    problems = [
        f"{n} {what}"
        for n, what in (
            (duplicates, "duplicates"),
            (missing, "missing"),
            (load["refused"], "refused callbacks"),
        )
        if n
    ]
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "model_first_token_ms": args.model_ms,
            "tokens": args.tokens,
            "seed": args.seed,
            "tag": args.tag,
        },
        "environment": result_files.environment(),
        "counts": {
            "sent": len(callback_at),
            "answered": answered,
            "duplicates": duplicates,
            "missing": missing,
            "refused_callbacks": load["refused"],
        },
        "messages_per_s": round(answered / wall, 2),
        "latency_ms": {
            "callback_http": stats.summarize(load["callback_ms"]),
            "callback_to_first_send": stats.summarize(first_send_ms),
        },
        "api_calls": load["calls"],
        "api_calls_per_answer": round(load["calls"] / answered, 3) if answered else None,
        "api_calls_per_answer_by_call": per_answer,
        "pulls_per_callback": round(by_call.get("sync_msg", 0) / max(len(callback_at), 1), 3),
        "service_cpu_ms_per_message": round(load["cpu_s"] * 1000 / max(len(callback_at), 1), 1),
        "api_errors": [list(e) for e in api.errors],
        "ok": not problems,
        "problems": problems,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(8, 5))
    for key, style in (("callback_http", ":"), ("callback_to_first_send", "-")):
        s = result["latency_ms"][key]
        if s["count"]:
            xs = [s["p50"], s["p90"], s["p99"], s["max"]]
            ax.plot([50, 90, 99, 100], xs, style, marker="o", label=key.replace("_", " "))
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms after the callback was posted")
    ax.set_title(f"swarmdesk wecom_kf bench: {result['parameters']['rate']:g} msg/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    plots.save_figure(plt, fig, path)


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    p, c, lat = r["parameters"], r["counts"], r["latency_ms"]
    first, cb = lat["callback_to_first_send"], lat["callback_http"]
    lines = [
        "",
        f"== swarmdesk bench wecom_kf: {p['rate']:g} msg/s for {p['duration_s']:g} s, model "
        f"{p['model_first_token_ms']:g} ms + {p['tokens']} tokens at 50/s ==",
        f"  sent {c['sent']}, answered exactly once {c['answered']}, duplicates "
        f"{c['duplicates']}, missing {c['missing']}, refused callbacks {c['refused_callbacks']}",
        f"  answered messages/s {r['messages_per_s']:g}; callback HTTP p50 "
        f"{report.fmt_ms(cb['p50'])} p99 {report.fmt_ms(cb['p99'])} ms",
        f"  callback -> first send_msg p50 {report.fmt_ms(first['p50'])} p90 "
        f"{report.fmt_ms(first['p90'])} p99 {report.fmt_ms(first['p99'])} ms",
        f"  API calls per answer {r['api_calls_per_answer']} "
        f"({r['api_calls_per_answer_by_call']}); sync_msg pages per callback "
        f"{r['pulls_per_callback']}; service CPU {r['service_cpu_ms_per_message']} ms/message",
    ]
    if r["api_errors"]:
        lines.append(f"  API errors answered by the fake: {r['api_errors'][:10]}")
    log = r["service_log"]
    if log["counts"]:
        lines.append("  service log: " + report.log_counts(log))
    return "\n".join(lines + report.summary_tail(r, files))
