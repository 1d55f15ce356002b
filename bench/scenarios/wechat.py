"""Scenario `wechat`: Official Account callbacks from a WeChat-like client, at several model speeds.

The client behaves like WeChat's server: it posts each shopper message to the service's
callback URL, signed, waits at most 5 seconds for the HTTP answer, and on a timeout, a dropped
connection or an error tries again with the same MsgId, three tries in all. If none of the
three gets an answer WeChat shows the shopper "该公众号暂时无法提供服务" ("cannot provide
service"). Answers arrive either as the passive reply in the HTTP response or through the
customer-service API, which a fake WeChat API in this process serves and records
(simulator/fakes/wechat_api.py).

Each shopper (openid) sends one message, so every delivery to an openid belongs to that
message. After the load the stored answers are read from the service's SQLite database and
compared with what each shopper received: `answered` means the shopper got the stored answer
exactly, once; `duplicates` counts shoppers who got more than that.

Model speed comes from simulator directives in the message (`[[sim:delay_ms=...]]` first
token, `tps`, `tokens`), one profile after the other against the same service. The service
runs one specialist without tools (one model call per answer) and no LLM routing, so a
profile's time is the answer's time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import xmltodict

from bench import options, plots, processes, prometheus, report, result_files, sampling, stats
from bench.http_client import fetch_text, http_client
from bench.service_config import base_service_config, one_specialist_sections, write_yaml
from bench.service_log import scan_json_log
from simulator.fakes.wechat_api import FakeWechatApi, sha1_sign, text_xml

NAME = "wechat"
HELP = (
    "WeChat Official Account load: a WeChat-like client (5 s timeout, 3 tries per MsgId) "
    "at several model speeds; answered share, duplicates, 'cannot provide service'"
)

TOKEN = "bench-token"
APPID = "wx_bench"
SECRET = "bench-secret"
PATH = "/wechat/bench"
TRIES = 3
WECHAT_TIMEOUT_S = 5.0

# name: (first token ms, tokens per second, reply tokens) -> about the time in the comment
PROFILES: dict[str, tuple[float, float, int]] = {
    "fast": (300, 50, 40),  # ~1.1 s: inside the passive window
    "edge": (1500, 25, 65),  # ~4.1 s: right at the 4 s passive budget
    "slow8": (6000, 40, 80),  # ~8 s: past WeChat's 5 s, answered through the API
}
QUESTIONS = (
    "这件羊毛大衣怎么保养？",
    "这款耳机音质怎么样？",
    "有没有适合夏天穿的连衣裙推荐？",
    "这个保温杯能装热牛奶吗？",
    "这双跑鞋偏大还是偏小？",
    "你们公司是哪一年成立的？",
    "Is the blue kettle good for tea?",
    "What material is this jacket made of?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=10.0, help="messages per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per profile")
    p.add_argument(
        "--profiles",
        default=",".join(PROFILES),
        help=f"comma-separated model speeds, from {', '.join(PROFILES)}",
    )
    p.add_argument("--budget", type=float, default=4.0, help="passive_budget_seconds")
    p.add_argument(
        "--lost-responses",
        type=float,
        default=0.0,
        help="share of HTTP answers the client pretends never arrived (network loss): it "
        "waits out the 5 s and tries again, as WeChat would",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--drain-timeout", type=float, default=40.0, help="wait for late answers")
    options.add_output_arguments(p)
    options.add_workspace_arguments(p, wait_quiet=None)


# --- records ------------------------------------------------------------------------------


@dataclass(slots=True)
class Msg:
    profile: str
    openid: str
    msg_id: str
    text: str
    sent: float = 0.0  # first try
    tries: int = 0
    timeouts: int = 0
    errors: int = 0
    lost: int = 0  # answers the client dropped on purpose (--lost-responses)
    acked: float | None = None  # `success` received
    passive: tuple[float, str] | None = None  # (time, content) of a passive reply received
    cannot_serve: bool = False
    bad_replies: list[str] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)  # each answered try: send -> answer


class WechatClient:
    """Posts like WeChat's server: signed, 5 s timeout, up to 3 tries of one MsgId."""

    def __init__(
        self, http: aiohttp.ClientSession, url: str, api: FakeWechatApi, lost: float, seed: int
    ) -> None:
        self.http = http
        self.url = url
        self.api = api
        self.lost = lost
        self.rng = random.Random(seed)

    def _params(self) -> dict[str, str]:
        ts, nonce = str(int(time.time())), secrets.token_hex(5)
        return {"signature": sha1_sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}

    async def deliver(self, m: Msg) -> None:
        self.api.user_wrote(m.openid)  # the shopper writes: the 48-hour window opens
        body = text_xml(m.openid, m.text, m.msg_id).encode("utf-8")
        m.sent = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=WECHAT_TIMEOUT_S)
        for attempt in range(1, TRIES + 1):
            m.tries = attempt
            started = time.monotonic()
            try:
                async with self.http.post(
                    self.url, params=self._params(), data=body, timeout=timeout
                ) as r:
                    status, text = r.status, await r.text()
            except TimeoutError:
                m.timeouts += 1
                continue
            except aiohttp.ClientError:
                m.errors += 1
                await asyncio.sleep(max(0.0, WECHAT_TIMEOUT_S - (time.monotonic() - started)))
                continue
            now = time.monotonic()
            m.http_ms.append((now - started) * 1000)
            if attempt < TRIES and self.rng.random() < self.lost:
                m.lost += 1  # as if it never arrived: WeChat waits out its 5 s, then retries
                await asyncio.sleep(max(0.0, WECHAT_TIMEOUT_S - (now - started)))
                continue
            if status != 200:
                m.errors += 1
                continue
            text = text.strip()
            if text in ("", "success"):
                m.acked = now
                return
            try:
                doc = xmltodict.parse(text)["xml"]
                m.passive = (now, str(doc.get("Content") or ""))
                return
            except Exception:
                m.bad_replies.append(text[:200])
                continue
        m.cannot_serve = True


# --- the run ------------------------------------------------------------------------------


def service_config(
    path: Path, *, port: int, db_url: str, sim_port: int, api_url: str, budget: float
) -> None:
    sections = one_specialist_sections(
        sim_port, max_concurrency=512, turn_deadline_s=30, specialist_timeout_s=25
    )
    config: dict[str, Any] = {
        **base_service_config(port, db_url),
        **sections,
        "worker": {"max_concurrent_conversations": 1024},
        "channels": {
            "wechat": {
                "enabled": True,
                "api_base_url": api_url,
                "official_accounts": [
                    {
                        "name": "bench",
                        "path": PATH,
                        "appid": APPID,
                        "token": TOKEN,
                        "secret_env": "BENCH_WX_SECRET",
                        "passive_budget_seconds": budget,
                    }
                ],
            }
        },
    }
    write_yaml(path, config)


async def run(args: argparse.Namespace) -> int:
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise SystemExit(f"bench: unknown profile(s) {unknown}; choose from {', '.join(PROFILES)}")
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    stem = f"wechat-r{args.rate:g}{('-' + args.tag) if args.tag else ''}"
    api = FakeWechatApi(quota_per_message=20)
    api.add_official_account(APPID, SECRET)
    api_url = await api.start()
    try:
        with processes.Workspace("bench-wechat-", keep=args.keep_tmp) as ws:
            sim = ws.simulator()
            svc = ws.service(env={"BENCH_WX_SECRET": SECRET})
            print(f"bench: temp dir {ws.tmp}; fake WeChat API {api_url}")
            service_config(
                ws.config_path,
                port=svc.port,
                db_url=f"sqlite+aiosqlite:///{ws.sqlite_path}",
                sim_port=sim.port,
                api_url=api_url,
                budget=args.budget,
            )
            sim.start()
            svc.start()
            msgs, windows = await _load(args, profiles, api, sim, svc)
            ws.stop()  # the stored answers are complete once the service has stopped
            stored = _stored_answers(ws.sqlite_path)
            result = _result(args, profiles, msgs, windows, api, stored)
            result["service_log"] = scan_json_log(svc.log_path)
            return result_files.publish(
                args.out, stem, result, lambda png: _plot(result, png), _summary
            )
    finally:
        await api.stop()


async def _load(
    args: argparse.Namespace,
    profiles: list[str],
    api: FakeWechatApi,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
) -> tuple[list[Msg], dict[str, tuple[float, float, float]]]:
    async with http_client() as http:
        base = svc.url
        await processes.wait_all_ready(http, sim, svc)
        client = WechatClient(http, base + PATH, api, args.lost_responses, args.seed)
        rng = random.Random(args.seed)
        # Warm-up: connections, the access_token, caches.
        warm = [_msg("warmup", rng, i) for i in range(3)]
        await asyncio.gather(*(client.deliver(m) for m in warm))
        await _quiet(http, base, api, [], 10.0)
        msgs: list[Msg] = []
        windows: dict[str, tuple[float, float, float]] = {}
        proc = psutil.Process(svc.pid)
        for profile in profiles:
            print(f"bench: profile {profile}: {args.rate:g} msg/s for {args.duration:g} s")
            batch: list[Msg] = []
            tasks: list[asyncio.Task[None]] = []
            start = time.monotonic()
            cpu0 = sampling.cpu_seconds(proc)
            n = int(args.rate * args.duration)
            for i in range(n):
                delay = start + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                m = _msg(profile, rng, i)
                batch.append(m)
                tasks.append(asyncio.create_task(client.deliver(m)))
            await asyncio.gather(*tasks)
            await _quiet(http, base, api, batch, args.drain_timeout)
            windows[profile] = (start, time.monotonic(), sampling.cpu_seconds(proc) - cpu0)
            msgs.extend(batch)
    return msgs, windows


def _msg(profile: str, rng: random.Random, i: int) -> Msg:
    q = rng.choice(QUESTIONS)
    if profile in PROFILES:
        delay, tps, tokens = PROFILES[profile]
        q += f" [[sim:delay_ms={delay:g}]] [[sim:tps={tps:g}]] [[sim:tokens={tokens}]]"
    openid = f"o_{profile}_{i}_{secrets.token_hex(3)}"
    return Msg(profile, openid, str(rng.randrange(10**18, 10**19)), q)


async def _quiet(
    http: aiohttp.ClientSession, base: str, api: FakeWechatApi, batch: list[Msg], limit: float
) -> None:
    """Wait until nothing is being answered and no delivery happened for a second."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        in_flight = 1.0
        text = await fetch_text(http, f"{base}/metrics")
        if text is not None:
            in_flight = prometheus.parse_samples(text).get("swarmdesk_replies_in_flight", 0.0)
        last = max((s.at for s in api.sent), default=0.0)
        if in_flight == 0 and time.monotonic() - last > 1.0:
            return
        await asyncio.sleep(0.25)
    print(f"bench: still answering after {limit:g} s of drain; counting what arrived")


def _stored_answers(db: Path) -> dict[str, list[tuple[str, str, str | None]]]:
    """MsgId -> the bot answers stored for it: (text, status, model)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT i.external_id, o.text, o.status, o.model FROM messages i "
            "JOIN messages o ON o.reply_to_id = i.id AND o.sender = 'bot' "
            "WHERE i.channel = 'wechat' AND i.direction = 'in' ORDER BY o.id"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for ext, text, status, model in rows:
        out.setdefault(str(ext), []).append((str(text), str(status), model))
    return out


# --- results ------------------------------------------------------------------------------


def _result(
    args: argparse.Namespace,
    profiles: list[str],
    msgs: list[Msg],
    windows: dict[str, tuple[float, float, float]],
    api: FakeWechatApi,
    stored: dict[str, list[tuple[str, str, str | None]]],
) -> dict[str, Any]:
    by_openid: dict[str, list[tuple[float, str]]] = {}
    for s in api.sent:
        by_openid.setdefault(s.to, []).append((s.at, s.text))
    out: dict[str, Any] = {}
    problems: list[str] = []
    for profile in profiles:
        batch = [m for m in msgs if m.profile == profile]
        first_ms: list[float] = []
        full_ms: list[float] = []
        typing_ms = [
            (api.first_typing[m.openid] - m.sent) * 1000
            for m in batch
            if m.openid in api.first_typing
        ]
        c = {
            "sent": len(batch),
            "answered": 0,
            "answered_passive": 0,
            "answered_api": 0,
            "answered_both": 0,
            "duplicates": 0,
            "stored_twice": 0,
            "cannot_provide_service": 0,
            "missing_or_partial": 0,
            "degraded": 0,
            "tries_beyond_first": 0,
            "timeouts": 0,
            "http_errors": 0,
            "lost_on_purpose": 0,
        }
        for m in batch:
            c["tries_beyond_first"] += m.tries - 1
            c["timeouts"] += m.timeouts
            c["http_errors"] += m.errors
            c["lost_on_purpose"] += m.lost
            c["cannot_provide_service"] += m.cannot_serve
            answers = stored.get(m.msg_id, [])
            c["stored_twice"] += len(answers) > 1
            final = answers[0][0] if answers else None
            if answers and answers[0][2] is None:
                c["degraded"] += 1
            events = sorted(by_openid.get(m.openid, []))
            if m.passive is not None:
                events = sorted([m.passive, *events])
            got = ""
            done_at: float | None = None
            for at, text in events:
                got += text
                if final is not None and done_at is None and got == final:
                    done_at = at
            if final is not None and got == final:
                c["answered"] += 1
                api_part = any(True for _ in by_openid.get(m.openid, []))
                if m.passive and api_part:
                    c["answered_both"] += 1
                elif m.passive:
                    c["answered_passive"] += 1
                else:
                    c["answered_api"] += 1
                first_ms.append((events[0][0] - m.sent) * 1000)
                assert done_at is not None
                full_ms.append((done_at - m.sent) * 1000)
            elif final is not None and len(got) > len(final) and final in got:
                c["duplicates"] += 1
            else:
                c["missing_or_partial"] += 1
        start, end, cpu = windows[profile]
        answered_share = c["answered"] / c["sent"] if c["sent"] else 0.0
        delay, tps, tokens = PROFILES[profile]
        out[profile] = {
            "model": {"first_token_ms": delay, "tps": tps, "tokens": tokens},
            "counts": c,
            "answered_share": round(answered_share, 4),
            "latency_ms": {
                "callback_answer": stats.summarize([x for m in batch for x in m.http_ms]),
                "typing_shown": stats.summarize(typing_ms),
                "first_reply": stats.summarize(first_ms),
                "full": stats.summarize(full_ms),
            },
            "messages_per_s": round(c["answered"] / args.duration, 2),
            "wall_s": round(end - start, 2),
            "service_cpu_s": round(cpu, 2),
            "service_cpu_ms_per_message": round(cpu * 1000 / c["sent"], 1) if c["sent"] else None,
        }
        for key in ("duplicates", "stored_twice", "cannot_provide_service", "missing_or_partial"):
            if c[key]:
                problems.append(f"{profile}: {c[key]} {key.replace('_', ' ')}")
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "profiles": profiles,
            "passive_budget_s": args.budget,
            "lost_responses": args.lost_responses,
            "wechat_timeout_s": WECHAT_TIMEOUT_S,
            "tries": TRIES,
            "seed": args.seed,
            "tag": args.tag,
        },
        "environment": result_files.environment(),
        "profiles": out,
        "api_errors": [list(e) for e in api.errors],
        "token_requests": len(api.token_requests),
        "ok": not problems,
        "problems": problems,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(9, 5))
    for name, r in result["profiles"].items():
        for key, style in (("first_reply", "--"), ("full", "-")):
            s = r["latency_ms"][key]
            if s["count"]:
                xs = [s["p50"], s["p90"], s["p99"], s["max"]]
                ax.plot([50, 90, 99, 100], xs, style, marker="o", label=f"{name} {key}")
    for name, r in result["profiles"].items():
        s = r["latency_ms"]["callback_answer"]
        if s["count"]:
            xs = [s["p50"], s["p90"], s["p99"], s["max"]]
            ax.plot([50, 90, 99, 100], xs, ":", marker="x", label=f"{name} callback HTTP answer")
    ax.axhline(5000, color="r", linewidth=0.8, label="WeChat gives up on a callback (5 s)")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms after the shopper's message")
    ax.set_title(f"swarmdesk wechat bench: {result['parameters']['rate']:g} msg/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    plots.save_figure(plt, fig, path)


def _summary(r: dict[str, Any], files: list[Path]) -> str:
    p = r["parameters"]
    lines = [
        "",
        f"== swarmdesk bench wechat: {p['rate']:g} msg/s for {p['duration_s']:g} s per profile, "
        f"passive budget {p['passive_budget_s']:g} s, WeChat-like client ({p['tries']} tries, "
        f"{p['wechat_timeout_s']:g} s timeout), lost responses {p['lost_responses']:g} ==",
        f"  {'profile (model time)':<24}{'sent':>6}{'answered':>10}{'passive':>8}{'api':>6}"
        f"{'both':>6}{'dup':>5}{'cannot':>7}{'retries':>8}"
        f"{'http p99':>9}{'typing p50':>11}{'first p50':>10}{'p99':>8}"
        f"{'full p50':>10}{'p99':>8}{'msg/s':>7}{'cpu ms/msg':>11}",
    ]
    for name, x in r["profiles"].items():
        c, lat, m = x["counts"], x["latency_ms"], x["model"]
        secs = (m["first_token_ms"] / 1000) + m["tokens"] / m["tps"]
        lines.append(
            f"  {f'{name} (~{secs:.1f} s)':<24}{c['sent']:>6}"
            f"{x['answered_share']:>10.1%}{c['answered_passive']:>8}{c['answered_api']:>6}"
            f"{c['answered_both']:>6}{c['duplicates'] + c['stored_twice']:>5}"
            f"{c['cannot_provide_service']:>7}{c['tries_beyond_first']:>8}"
            f"{report.fmt_ms(lat['callback_answer']['p99']):>9}"
            f"{report.fmt_ms(lat['typing_shown']['p50']):>11}"
            f"{report.fmt_ms(lat['first_reply']['p50']):>10}"
            f"{report.fmt_ms(lat['first_reply']['p99']):>8}"
            f"{report.fmt_ms(lat['full']['p50']):>10}{report.fmt_ms(lat['full']['p99']):>8}"
            f"{x['messages_per_s']:>7g}{report.fmt_ms(x['service_cpu_ms_per_message']):>11}"
        )
    lines.append(
        "  (answered: the shopper got the stored answer exactly, once; passive/api/both: how; "
        "dup: got more than the answer or stored twice; cannot: 3 tries without an HTTP "
        "answer, WeChat's 'cannot provide service'; http: the callback's HTTP answer (WeChat "
        "gives up at 5000); typing: 'typing' first shown; first/full: "
        "first piece / whole answer received; ms from the first try)"
    )
    degraded = {
        n: x["counts"]["degraded"] for n, x in r["profiles"].items() if x["counts"]["degraded"]
    }
    if degraded:
        lines.append(f"  degraded (fallback text) answers: {degraded}")
    if r["api_errors"]:
        lines.append(f"  WeChat API errors answered by the fake: {r['api_errors'][:10]}")
    log = r["service_log"]
    if log["counts"]:
        lines.append("  service log: " + report.log_counts(log))
    return "\n".join(lines + report.summary_tail(r, files))
