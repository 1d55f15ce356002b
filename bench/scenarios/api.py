"""Scenario `api`: open-loop load on the HTTP API channel, answered by the model simulator.

Starts the simulator and the service as subprocesses, measures the simulator's own first-token
latency, then sends shopper messages at a fixed rate (Poisson or evenly spaced arrivals) over
many conversations, each followed on its Server-Sent Events stream, and records per message
the POST latency and the time from sending the POST to the answer's first delta and final.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    api_load,
    api_service,
    options,
    plots,
    processes,
    report,
    result_files,
    sampling,
    stats,
)
from bench.http_client import http_client

NAME = "api"
HELP = "open-loop messages through POST /api/v1/messages, answers read from the SSE stream"

TARGET_P99_OVERHEAD_MS = 5.0
# Default conversation cap: enough for every reply to take this much longer than the model.
CONVERSATION_SLACK_S = 2.0


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
    options.add_simulator_arguments(p)
    options.add_db_arguments(p)
    options.add_open_loop_arguments(p)
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
    options.add_output_arguments(p, profile=True)
    options.add_workspace_arguments(p, tmp_dir=True)


# --- the run ------------------------------------------------------------------------------


def conversation_cap(args: argparse.Namespace) -> int:
    if args.conversations is not None:
        return int(args.conversations)
    tps = float(args.sim_tps)
    reply_s = float(args.sim_first_token_ms) / 1000 + (args.reply_tokens / tps if tps > 0 else 0)
    return max(1, math.ceil(float(args.rate) * (reply_s + CONVERSATION_SLACK_S)))


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    db = "floor" if args.service == "floor" else args.db
    stem = f"api-{db}-r{args.rate:g}{('-' + args.tag) if args.tag else ''}"
    with processes.Workspace("bench-", parent=args.tmp_dir, keep=args.keep_tmp) as ws:
        sim = ws.simulator(options.simulator_options(args))
        svc = (
            ws.floor_relay(sim)
            if args.service == "floor"
            else ws.service(env={"SWARMDESK_API_KEY": api_service.API_KEY}, profile=args.profile)
        )
        ws.use_ref(args.ref)
        print(f"bench: temp dir {ws.tmp}; service code from {args.ref or 'the working tree'}")
        async with ws.database(args.db, args.pg_admin_dsn) as db_url:
            api_service.service_config(
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
        return result_files.publish(
            args.out,
            stem,
            result,
            lambda png: _plot(result, measured, png),
            _summary,
            service_log=svc.log_path,
            profile=ws.profile_path if args.profile else None,
        )


async def _measure(
    args: argparse.Namespace,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
    config_path: Path,
) -> dict[str, Any]:
    async with http_client(sock_read_s=60) as http:
        m = await api_load.before_load(http, args, sim, svc)
        load = api_load.ApiLoad(
            http,
            svc.url,
            max_conversations=conversation_cap(args),
            seed=args.seed,
            degraded_texts=api_service.degraded_texts(config_path, svc.env),
            tag_model_calls=True,
        )
        await load.warmup(args.warmup)
        announce = f"bench: sending {args.rate:g} msg/s for {args.duration:g} s ({args.arrival})"
        return await api_load.measure_load(http, args, sim, svc, load, m, announce)


# --- results ------------------------------------------------------------------------------


def _result(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    load: api_load.ApiLoad = m["load"]
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
    shifted = api_load.finals_shifted(answered, start, args.duration)
    accepted = [msg for msg in msgs if msg.status == 202]
    # No answer and no error: the POST or the answer had not arrived when the drain ended.
    unanswered = [msg for msg in msgs if msg.final is None and msg.error is None]
    stream_error_msgs = [msg for msg in accepted if msg.final is None and msg.error]
    first = stats.summarize(first_ms)
    base = stats.summarize(baseline)
    overhead = stats.overhead_ms(first, base)
    split = _split_by_model_call(answered, m.get("sim_timings", {}))

    cpu: dict[str, float] = m["cpu"]
    wall = end - start
    rss: sampling.RssSampler = m["rss"]
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
        "created_at": result_files.now_iso(),
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
        "environment": result_files.environment(),
        "service_code": m["service_code"],
        "rate_requested": args.rate,
        "rate_sent": round(len(msgs) / args.duration, 2),
        "messages_per_s_achieved": round(finals_in_window / args.duration, 2),
        "messages_per_s_achieved_shifted": round(shifted / args.duration, 2),
        "llm_requests_per_message": round(sim_requests / len(msgs), 3)
        if isinstance(sim_requests, int) and msgs
        else None,
        "latency_ms": {
            "post": stats.summarize(post_ms),
            "first_delta": first,
            "final": stats.summarize(final_ms),
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
            "stream_open_ms": stats.summarize(
                [c.stream_open_ms for c in load.convs if c.stream_open_ms is not None]
            ),
            "send_lag_ms": stats.summarize(lag_ms),
            "last_post_after_start_s": round(times["last_post"] - start, 2),
            "drain_s": round(end - times["last_post"], 2),
        },
        **api_load.closing_keys(m, problems, wall, lag_ms),
    }


def _split_by_model_call(
    answered: list[api_load.Msg], timings: dict[str, list[float]]
) -> dict[str, Any]:
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
        "added": stats.summarize(added),
        "post_to_model_request": stats.summarize(before),
        "simulator_own": stats.summarize(own),
        "model_first_token_to_first_delta": stats.summarize(after),
    }


def _plot(result: dict[str, Any], m: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    load: api_load.ApiLoad = m["load"]
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
    plots.plot_percentiles(ax, series, "ms")
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
    plots.save_figure(plt, fig, path)


def _row(label: str, s: dict[str, Any]) -> str:
    return report.latency_row(label, s, 30)


def _split_rows(split: dict[str, Any]) -> list[str]:
    if not split["added"].get("count"):
        return []  # a simulator without [[sim:tag]] timings (an older --ref)
    return [
        "",
        report.latency_header("first delta, split at the model", 30),
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
        report.latency_header("latency, ms from POST sent", 30),
        _row("POST response", lat["post"]),
        _row("first delta", lat["first_delta"]),
        _row("final", lat["final"]),
        _row("SSE stream open (GET->headers)", r["client"]["stream_open_ms"]),
        _row("simulator first token (direct)", r["simulator_baseline_ms"]["first_token"]),
        *_split_rows(r["service_overhead_without_simulator_ms"]),
        "",
        f"service overhead at first delta: p50 {report.fmt_ms(over['p50'])} ms, p99 "
        f"{report.fmt_ms(over['p99'])} ms beyond the direct baseline; "
        + (
            f"per message beyond the simulator's own time p50 {report.fmt_ms(added['p50'])} ms, "
            f"p99 {report.fmt_ms(added['p99'])} ms"
            if added["count"]
            else "(no per-message split: the simulator did not time the calls)"
        )
        + f" (target p99 <= {target['p99_first_delta_overhead_ms_max']:g} ms: {verdict})",
        f"service CPU {cpu['service_s']:g} s in {cpu['window_s']:g} s "
        f"({cpu['service_core_share']:.0%} of a core), "
        f"{report.fmt_ms(cpu['service_s_per_1000_messages'])} CPU-s per 1000 messages; "
        f"simulator {cpu['simulator_core_share']:.0%}, load generator "
        f"{cpu['loadgen_core_share']:.0%} of a core",
        f"machine: {cpu['machine_busy_cores']:.2f} of {r['environment']['cpu_count']} cores busy; "
        f"other processes {cpu['other_processes_cores']:.2f} cores during the load "
        f"({cpu['other_processes_cores_before']:.2f} just before)",
        f"service RSS peak {mem['service_peak_rss']:g} MB (before the load "
        f"{mem['service_rss_before']:g} MB)",
        f"load generator send lag p99 {report.fmt_ms(r['client']['send_lag_ms']['p99'])} ms, "
        f"stream reconnects {c['stream_reconnects']}, drain after last POST "
        f"{r['client']['drain_s']:g} s",
    ]
    if log["counts"]:
        top = report.log_counts(log)
        lines.append(f"service log: {top}")
    else:
        lines.append("service log: no warnings or errors")
    return "\n".join(lines + report.summary_tail(r, files))
