"""Scenario `orchestration`: the shop's traffic mix through routing, specialists and tools.

Shopper messages (bench/scenarios/shopper_messages.py: logistics 35%, refund 25%, product
25%, discount 15%, in English and Chinese, naming the demo shop's orders, parcels, products
and coupons) go through the HTTP API channel at a fixed rate, open loop, to a service with
the default specialists and tools, whose two tiers point at the standalone simulator. The
load generator, the simulator baseline and the service config are the ones the `api`
scenario runs too (bench/api_load.py, bench/api_service.py); what this one adds is reading
the service's own record after the run (the temp database: routing JSON and tier of every
answer, the llm_calls ledger) and, with `--fault-rate`, simulator calls that fail, hang, are
rate-limited or cut off.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import api_load, api_service, options, plots, processes, report, result_files, stats
from bench.http_client import http_client
from bench.scenarios.shopper_messages import DEFAULT_MIX, ShopperMessages
from bench.service_config import deep_merge, write_yaml
from bench.sse import SseEvent

NAME = "orchestration"
HELP = (
    "the traffic mix (logistics/refund/product/discount) through routing, specialists and "
    "tools; cost, tiers, model calls; optionally with simulator faults"
)

FAULT_KINDS = ("500", "hang", "429", "cut")
# Simulator config field of each fault kind (POST /_sim/config).
_FAULT_FIELDS = {
    "500": "fail_rate",
    "hang": "hang_rate",
    "429": "rate_limit_rate",
    "cut": "cut_rate",
}
TARGET_MODEL_SHARE = 0.995  # answered by a model (or the FAQ), not canned, under faults
PURPOSES = ("classify", "reply", "tool_followup", "aggregate")
# A conversation holds one message at a time while the service keeps up; a turn with tools
# or several specialists takes a few model calls, hence the generous default cap.
CONVERSATION_HOLD_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=20.0, help="messages per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of simulator calls that go wrong during the load, split evenly over "
        "--fault-kinds (the baseline and the warm-up run without faults)",
    )
    p.add_argument(
        "--fault-kinds",
        default=",".join(FAULT_KINDS),
        help="which faults: 500 (server error), hang (accepts, never answers), 429 (rate "
        "limit with Retry-After), cut (stream closed half-way)",
    )
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of a 429, s")
    p.add_argument(
        "--mix",
        default=",".join(f"{k}={v:g}" for k, v in DEFAULT_MIX.items()),
        help="traffic mix: category=share,...",
    )
    p.add_argument("--zh-share", type=float, default=0.5, help="share of Chinese messages")
    p.add_argument(
        "--messages-per-conversation",
        type=int,
        default=3,
        help="a shopper's visit: after this many messages the conversation is left and a "
        "new one opens (keeps sticky tiers and histories realistic)",
    )
    p.add_argument(
        "--conversations",
        type=int,
        default=None,
        help="at most this many open conversations; at the cap a message queues behind the "
        f"least busy one. Default: rate x {CONVERSATION_HOLD_S:g} s",
    )
    p.add_argument(
        "--chains",
        choices=("fallback", "single"),
        default="fallback",
        help="fallback: each tier's chain has the other model second, like the example "
        "config (cheap: [sim-cheap, sim-premium], premium: [sim-premium, sim-cheap]); "
        "single: one model per tier",
    )
    p.add_argument(
        "--providers",
        choices=("two", "one"),
        default="two",
        help="two: each model on a provider of its own (sim-a/sim-cheap, sim-b/sim-premium), "
        "like the example config's two vendors, each with its own connection limit; one: "
        "both on provider 'sim'",
    )
    p.add_argument(
        "--provider-max-concurrency",
        type=int,
        default=None,
        help="providers[].max_concurrency (default: the service's default)",
    )
    p.add_argument(
        "--cheap-price",
        default="0.27,1.10",
        help="sim-cheap input,output price per million tokens",
    )
    p.add_argument(
        "--premium-price",
        default="2.0,8.0",
        help="sim-premium input,output price per million tokens",
    )
    options.add_simulator_arguments(p)
    options.add_db_arguments(p)
    options.add_open_loop_arguments(p)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="wait this long for late answers after the last message (default: the turn "
        "deadline + 5 s)",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="benchmark this git commit/branch (exported to the temp dir) instead of the "
        "working tree",
    )
    p.add_argument(
        "--service-config",
        type=Path,
        default=None,
        help="YAML merged over the generated service config (e.g. reply: or resilience:)",
    )
    options.add_output_arguments(p)
    options.add_workspace_arguments(p, tmp_dir=True)


# --- parameters ---------------------------------------------------------------------------


def _mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or share < 0:
            raise SystemExit(f"bench: --mix '{text}': write category=share,... (e.g. refund=0.25)")
        out[key.strip()] = share
    if not any(out.values()):
        raise SystemExit("bench: --mix: at least one share must be positive")
    return out


def _price(text: str, option: str) -> tuple[float, float]:
    try:
        pin, pout = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"bench: {option} '{text}': write input,output (e.g. 0.27,1.10)") from None
    return pin, pout


def _fault_rates(args: argparse.Namespace) -> dict[str, float]:
    """Simulator config fields for the load (all zero without --fault-rate)."""
    kinds = [k.strip() for k in args.fault_kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        raise SystemExit(f"bench: --fault-kinds: use some of {', '.join(FAULT_KINDS)}")
    if not 0 <= args.fault_rate <= 1:
        raise SystemExit("bench: --fault-rate is a share from 0 to 1")
    rates = dict.fromkeys(_FAULT_FIELDS.values(), 0.0)
    for kind in kinds:
        rates[_FAULT_FIELDS[kind]] = round(args.fault_rate / len(kinds), 6)
    return rates


def conversation_cap(args: argparse.Namespace) -> int:
    if args.conversations is not None:
        return int(args.conversations)
    return max(1, math.ceil(float(args.rate) * CONVERSATION_HOLD_S))


def _stem(args: argparse.Namespace) -> str:
    fault = f"-f{args.fault_rate:g}" if args.fault_rate else ""
    tag = f"-{args.tag}" if args.tag else ""
    return f"orchestration-{args.db}-r{args.rate:g}{fault}{tag}"


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What this scenario sets over the HTTP API service config: the two simulator
    models with their prices and the tier chains; the default specialists, tools and routing
    stay as they are. `--service-config` goes on top."""
    cheap, premium = (
        _price(args.cheap_price, "--cheap-price"),
        _price(args.premium_price, "--premium-price"),
    )
    # Which provider serves each model: one ("sim") or one each, like two vendors.
    host = {"sim-cheap": "sim", "sim-premium": "sim"}
    if args.providers == "two":
        host = {"sim-cheap": "sim-a", "sim-premium": "sim-b"}
    ref = {model: f"{provider}/{model}" for model, provider in host.items()}
    tiers = {"cheap": [ref["sim-cheap"]], "premium": [ref["sim-premium"]]}
    if args.chains == "fallback":
        tiers = {
            "cheap": [ref["sim-cheap"], ref["sim-premium"]],
            "premium": [ref["sim-premium"], ref["sim-cheap"]],
        }
    prices = {"sim-cheap": cheap, "sim-premium": premium}
    providers: dict[str, dict[str, Any]] = {}
    for model, provider in host.items():
        entry = providers.setdefault(
            provider,
            # {sim_port} is filled in by write_service_config.
            {"name": provider, "base_url": "http://127.0.0.1:{sim_port}/v1", "models": []},
        )
        if args.provider_max_concurrency is not None:
            entry["max_concurrency"] = args.provider_max_concurrency
        pin, pout = prices[model]
        entry["models"].append(
            {"name": model, "input_price_per_mtok": pin, "output_price_per_mtok": pout}
        )
    config: dict[str, Any] = {"providers": list(providers.values()), "tiers": tiers}
    if args.service_config is not None:
        extra = yaml.safe_load(args.service_config.read_text("utf-8")) or {}
        if not isinstance(extra, dict):
            raise SystemExit(f"bench: {args.service_config}: expected a mapping of sections")
        config = deep_merge(config, extra)
    return config


def write_service_config(
    args: argparse.Namespace, path: Path, *, port: int, db_url: str, sim_port: int
) -> Path:
    """The HTTP API service config (server, database, log, worker) with `overrides`."""
    extra = overrides(args)
    for provider in extra.get("providers", []):
        if isinstance(provider, dict) and "{sim_port}" in str(provider.get("base_url", "")):
            provider["base_url"] = str(provider["base_url"]).format(sim_port=sim_port)
    extra_path = write_yaml(path.parent / "orchestration-overrides.yaml", extra)
    api_service.service_config(
        path,
        port=port,
        db_url=db_url,
        sim_port=sim_port,
        max_concurrency=None,
        orchestration="service-default",
        overrides=extra_path,
    )
    return path


_SETTINGS_SCRIPT = """
import json, sys
from bot.settings import load_settings
s = load_settings(sys.argv[1])
r = s.reply
print(json.dumps({
    "turn_deadline_seconds": r.turn_deadline_seconds,
    "aggregation_reserve_seconds": r.aggregation_reserve_seconds,
    "handoff_notices": [t for t in (r.handoff_notice, r.handoff_notice_zh) if t],
    "canned_extra": [t for sp in s.specialists for t in (sp.degraded_text_zh,) if t]
        + [t for t in (s.budgets.exhausted_text, s.budgets.exhausted_text_zh) if t],
    "specialists": {sp.name: {"tier": sp.tier, "timeout_seconds": sp.timeout_seconds,
                              "intents": sp.intents, "tools": sp.tools} for sp in s.specialists},
    "tiers": s.tiers,
    "hedge_after_seconds": s.resilience.hedge_after_seconds,
    "retries": s.resilience.retries,
}))
"""


def service_facts(config: Path, env: Mapping[str, str] | None) -> dict[str, Any]:
    """Settings the report needs, read by the service's own code (its defaults included)."""
    done = subprocess.run(
        [sys.executable, "-c", _SETTINGS_SCRIPT, str(config)],
        env=dict(env) if env is not None else None,
        cwd=config.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        facts: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(
            f"bench: could not read the service settings of {config}:\n{done.stderr[-2000:]}"
        ) from None
    return facts


# --- the load -------------------------------------------------------------------------------


class MixLoad(api_load.ApiLoad):
    """The HTTP API load with shopper visits: a conversation takes `per_conversation` messages
    and is then left (its stream closed); one the service handed to a person (its answer
    carries the handoff notice) is left at once. The cap counts open conversations."""

    def __init__(
        self,
        *args: Any,
        per_conversation: int,
        handoff_notices: Sequence[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.per_conversation = max(1, per_conversation)
        self.handoff_notices = tuple(handoff_notices)
        self.sent_to: Counter[int] = Counter()

    def _pick_conversation(self) -> api_load.Conv:
        conv = super()._pick_conversation()
        self.sent_to[conv.key] += 1
        if self.sent_to[conv.key] >= self.per_conversation:
            conv.retired = True  # the visit ends with this message's answer
        return conv

    def _counted(self, live: list[api_load.Conv]) -> int:
        return len(live)  # a visit that ended frees its place

    def _settle(self, msg: api_load.Msg) -> None:
        super()._settle(msg)
        conv = msg.conv
        if conv is not None and conv.retired and conv.outstanding == 0 and conv.task:
            conv.task.cancel()  # the shopper left: close the stream (may be this very task)

    def _on_event(self, conv: api_load.Conv, ev: SseEvent, now: float) -> None:
        if ev.event == "final" and self.handoff_notices:
            text = str(json.loads(ev.data).get("text") or "")
            if any(notice in text for notice in self.handoff_notices):
                if not conv.retired:
                    self.counters["conversations_handed_off"] += 1
                conv.retired = True  # a person owns it now: the bot will not answer there
        super()._on_event(conv, ev, now)


# --- the run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0:
        raise SystemExit("bench: --rate and --duration must be positive")
    mix = _mix(args.mix)
    messages = ShopperMessages(mix=mix, zh_share=args.zh_share)
    fault_rates = _fault_rates(args)
    stem = _stem(args)
    with processes.Workspace("bench-orch-", parent=args.tmp_dir, keep=args.keep_tmp) as ws:
        sim = ws.simulator(
            [
                *options.simulator_options(args),
                *("--retry-after", str(args.retry_after), "--seed", str(args.seed)),
            ]
        )
        svc = ws.service(env={"SWARMDESK_API_KEY": api_service.API_KEY})
        ws.use_ref(args.ref)
        print(f"bench: temp dir {ws.tmp}; service code from {args.ref or 'the working tree'}")
        async with ws.database(args.db, args.pg_admin_dsn) as db_url:
            config = write_service_config(
                args, ws.config_path, port=svc.port, db_url=db_url, sim_port=sim.port
            )
            facts = service_facts(config, svc.env)
            if args.drain_timeout is None:
                args.drain_timeout = float(facts["turn_deadline_seconds"]) + 5.0
            sim.start()
            svc.start()
            measured = await _measure(args, sim, svc, config, messages, fault_rates, facts)
            ws.stop()  # the record is complete once the service has stopped
            measured["db"] = await read_record(db_url, [m.message_id for m in measured["msgs"]])
            measured["costs_table"] = swarmdesk_costs(config, svc.env, measured["since"])
        measured.update(ws.service_outcome(svc))
        result = _result(args, measured, messages, facts, fault_rates)
        return result_files.publish(
            args.out,
            stem,
            result,
            lambda png: _plot(result, measured, png),
            _summary,
            service_log=svc.log_path,
        )


async def _measure(
    args: argparse.Namespace,
    sim: processes.ManagedProcess,
    svc: processes.ManagedProcess,
    config: Path,
    messages: ShopperMessages,
    fault_rates: dict[str, float],
    facts: dict[str, Any],
) -> dict[str, Any]:
    # Turns with tools and several specialists take longer between stream events.
    async with http_client(sock_read_s=120) as http:
        m = await api_load.before_load(http, args, sim, svc)
        load = MixLoad(
            http,
            svc.url,
            max_conversations=conversation_cap(args),
            seed=args.seed,
            degraded_texts=api_service.degraded_texts(config, svc.env),
            message_text=messages,
            per_conversation=args.messages_per_conversation,
            handoff_notices=facts["handoff_notices"],
        )
        await load.warmup(args.warmup)
        if args.fault_rate:
            await _simulator_config(http, sim.url, fault_rates)
            print(f"bench: simulator faults on: {fault_rates}")
        m["since"] = datetime.now(UTC)  # the warm-up's ledger rows are all older
        announce = (
            f"bench: sending {args.rate:g} msg/s for {args.duration:g} s ({args.arrival}), "
            f"then up to {args.drain_timeout:g} s for the last answers"
        )
        m = await api_load.measure_load(http, args, sim, svc, load, m, announce)
    m["msgs"] = load.msgs
    return m


async def _simulator_config(
    http: aiohttp.ClientSession, sim_url: str, fields: Mapping[str, float]
) -> None:
    url = f"{sim_url}/_sim/config"
    async with http.post(url, json=dict(fields)) as r:
        if r.status != 200:
            raise RuntimeError(f"simulator refused {dict(fields)}: {await r.text()}")


# --- the service's record -------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """What the service stored for one measured message."""

    inbound_status: str | None = None
    routing: dict[str, Any] | None = None  # of the bot's answer (or the inbound message)
    answers: list[dict[str, Any]] = field(default_factory=list)  # bot messages replying
    calls: list[dict[str, Any]] = field(default_factory=list)  # llm_calls rows


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


async def read_record(db_url: str, message_ids: Sequence[int | None]) -> dict[int, Record]:
    """Inbound status, bot answers and ledger rows of the given inbound messages."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    wanted = {i for i in message_ids if i is not None}
    out = {i: Record() for i in wanted}
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT id, reply_to_id, sender, direction, status, text, tier, model, "
                    "routing, cost, latency_ms, first_delta_ms FROM messages"
                )
            )
            for row in rows.mappings():
                if row["id"] in wanted and row["direction"] == "in":
                    rec = out[row["id"]]
                    rec.inbound_status = row["status"]
                    rec.routing = rec.routing or _json(row["routing"])
                elif row["reply_to_id"] in wanted and row["sender"] == "bot":
                    answer = dict(row)
                    answer["routing"] = _json(answer["routing"])
                    out[row["reply_to_id"]].answers.append(answer)
            rows = await conn.execute(
                text(
                    "SELECT message_id, tier, model, specialist, purpose, intent, outcome, cost, "
                    "input_tokens, output_tokens, first_token_ms, latency_ms FROM llm_calls"
                )
            )
            for row in rows.mappings():
                if row["message_id"] in wanted:
                    out[row["message_id"]].calls.append(dict(row))
    finally:
        await engine.dispose()
    for rec in out.values():
        live = [a for a in rec.answers if a["status"] != "abandoned"]
        if live and live[-1]["routing"] is not None:
            rec.routing = live[-1]["routing"]
    return out


def swarmdesk_costs(config: Path, env: Mapping[str, str] | None, since: datetime) -> str:
    """`swarmdesk costs --since <load start>` against the run's database."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bot.cli", "--config", str(config)),
            *("costs", "--since", since.isoformat(timespec="seconds")),
        ],
        env=dict(env) if env is not None else None,
        cwd=config.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"(swarmdesk costs failed with code {done.returncode}: {done.stderr[-500:]})"
    return done.stdout.rstrip()


# --- results ------------------------------------------------------------------------------


def _share(part: int | float, whole: int | float) -> float | None:
    return round(part / whole, 4) if whole else None


def _answer_kind(rec: Record, canned_texts: frozenset[str]) -> str:
    """faq | model | canned (the turn's answer is a fallback) | none."""
    live = [a for a in rec.answers if a["status"] != "abandoned"]
    if not live:
        return "none"
    answer = live[-1]
    routing = answer["routing"] or rec.routing or {}
    if routing.get("degraded") or str(answer["text"] or "") in canned_texts:
        return "canned"
    if routing.get("stage") == "faq" or (not rec.calls and routing.get("faq_answer")):
        return "faq"
    return "model"


def _result(
    args: argparse.Namespace,
    m: dict[str, Any],
    messages: ShopperMessages,
    facts: dict[str, Any],
    fault_rates: dict[str, float],
) -> dict[str, Any]:
    load: MixLoad = m["load"]
    msgs: list[api_load.Msg] = m["msgs"]
    db: dict[int, Record] = m["db"]
    times: dict[str, float] = m["times"]
    start, end = times["start"], times["end"]
    deadline_s = float(facts["turn_deadline_seconds"])
    canned_texts = load.degraded_texts | frozenset(facts["canned_extra"])

    answered = [x for x in msgs if x.final is not None]
    unanswered = [x for x in msgs if x.final is None and x.error is None]
    first_ms = [v for v in (x.ms(x.first_delta) for x in answered) if v is not None]
    final_ms = [v for v in (x.ms(x.final) for x in answered) if v is not None]
    lag_ms = load.send_lag_ms()

    # Per message: the service's record.
    kinds: Counter[str] = Counter()
    tiers: Counter[str] = Counter()
    answer_models: Counter[str] = Counter()
    purposes: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    call_models: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    inbound_status: Counter[str] = Counter()
    no_delta: Counter[str] = Counter()  # answers whose deltas the client missed, by kind
    canned_outcomes: Counter[str] = Counter()  # what the calls of canned turns ended as
    canned_no_attempt = 0  # canned turns where a specialist got no model call at all
    spec_counts: Counter[int] = Counter()
    by_parts: dict[str, dict[str, list[float]]] = {
        shape: {"first_delta": [], "final": []} for shape in ("single", "multi")
    }
    by_category: dict[str, dict[str, Any]] = {}
    partial = no_model = duplicates = over_deadline_service = 0
    agree = routed = 0
    cost_total = 0.0
    db_latency: list[float] = []
    over_by: list[float] = []  # how far turns longer than the deadline went past it, ms
    before_turn: list[float] = []  # client's final - the stored turn: queue, DB, delivery
    examples: dict[str, list[tuple[float, dict[str, Any]]]] = {"slowest": [], "canned": []}
    recorded = [x for x in msgs if x.message_id is not None and x.message_id in db]
    for x in recorded:
        assert x.message_id is not None
        rec = db[x.message_id]
        inbound_status[rec.inbound_status or "missing"] += 1
        live = [a for a in rec.answers if a["status"] != "abandoned"]
        if len(live) > 1:
            duplicates += len(live) - 1
        kind = _answer_kind(rec, canned_texts)
        kinds[kind] += 1
        if x.final is not None and x.first_delta is None:
            no_delta[kind] += 1
        category = messages.category_of.get(x.text, "?")
        cat = by_category.setdefault(
            category, {"sent": 0, "kinds": Counter(), "calls": 0, "cost": 0.0, "final_ms": []}
        )
        cat["sent"] += 1
        cat["kinds"][kind] += 1
        cat["calls"] += len(rec.calls)
        cost = sum(float(c["cost"] or 0.0) for c in rec.calls)
        cat["cost"] += cost
        if x.final is not None:
            cat["final_ms"].append(x.ms(x.final))
        if kind == "none":
            continue
        cost_total += cost
        if not rec.calls:
            no_model += 1
        for c in rec.calls:
            purposes[str(c["purpose"])] += 1
            outcomes[str(c["outcome"])] += 1
            call_models[f"{c['model']} ({c['outcome']})"] += 1
        answer = live[-1]
        tiers[str(answer["tier"] or "none (no model)")] += 1
        answer_models[str(answer["model"] or "none")] += 1
        if answer["latency_ms"] is not None:
            db_latency.append(float(answer["latency_ms"]))
            if x.final is not None:
                before_turn.append((x.ms(x.final) or 0.0) - float(answer["latency_ms"]))
            if float(answer["latency_ms"]) > deadline_s * 1000:
                over_deadline_service += 1
                over_by.append(float(answer["latency_ms"]) - deadline_s * 1000)
        routing = rec.routing or {}
        stages[str(routing.get("stage", "?"))] += 1
        turn_ms = float(answer["latency_ms"] or 0.0)
        examples["slowest"].append((turn_ms, _example(x, rec, answer)))
        if kind == "canned" and len(examples["canned"]) < 5:
            examples["canned"].append((turn_ms, _example(x, rec, answer)))
        specialists = routing.get("specialists") or []
        spec_counts[len(specialists)] += 1
        if kind == "model" and x.final is not None:
            # Model answers by how many specialists (parts) they had: issue 14's figures.
            shape = "multi" if len(specialists) > 1 else "single"
            if (v := x.ms(x.first_delta)) is not None:
                by_parts[shape]["first_delta"].append(v)
            if (v := x.ms(x.final)) is not None:
                by_parts[shape]["final"].append(v)
        results = routing.get("specialist_results") or {}
        if kind == "canned":
            canned_outcomes.update(str(c["outcome"]) for c in rec.calls)
            tried = {c["specialist"] for c in rec.calls}
            # No row for a failed specialist: no model of its chain was admitted (Retry-After
            # cooling, an open breaker) for its first or a later round.
            if any(name not in tried for name, r in results.items() if not r.get("ok")):
                canned_no_attempt += 1
        if kind == "model" and any(not r.get("ok", True) for r in results.values()):
            partial += 1
        intents = routing.get("intents") or []
        if intents and category in DEFAULT_MIX:
            routed += 1
            agree += intents[0] == category

    n_answered_db = sum(kinds.values()) - kinds["none"]
    good = kinds["model"] + kinds["faq"]
    model_share = _share(good, len(msgs))
    final_p99 = stats.percentile(final_ms, 99)
    over_deadline_client = sum(1 for v in final_ms if v > deadline_s * 1000)

    finals_shifted = api_load.finals_shifted(answered, start, args.duration)
    # A backlog shows as answers getting slower over the load: compare its thirds.
    thirds: list[float | None] = []
    for i in range(3):
        lo, hi = start + args.duration * i / 3, start + args.duration * (i + 1) / 3
        part = [v for x in answered if lo <= x.sent < hi and (v := x.ms(x.final)) is not None]
        thirds.append(round(stats.percentile(part, 50), 1) if part else None)

    cpu: dict[str, float] = m["cpu"]
    wall = end - start
    counters = load.counters
    counts = {
        "sent": len(msgs),
        "accepted": sum(1 for x in msgs if x.status == 202),
        "answered": len(answered),
        "unanswered": len(unanswered),
        "duplicates_seen_by_client": counters["duplicate_finals"],
        "duplicates_in_db": duplicates,
        "errors": load.errors(),
        "post_errors": counters["post_errors"],
        "stream_error_events": counters["error_events"],
        "answered_without_delta": sum(1 for x in answered if x.first_delta is None),
        # An answer ready before its new conversation's stream was open shows no delta
        # (deltas are not replayed, finals are); FAQ answers are that fast.
        "answered_without_delta_by_kind": dict(no_delta),
        "conversations": len(load.convs),
        "conversations_handed_off": counters["conversations_handed_off"],
        "sent_to_busy_conversation": counters["sent_to_busy_conversation"],
        # The service drops a subscriber that reads too slowly; the client then resumes.
        "stream_disconnects": counters["stream_disconnects"],
        "stream_reconnects": counters["stream_reconnects"],
        "inbound_status_in_db": dict(inbound_status),
        "not_in_db": len(msgs) - len(recorded),
    }
    n = n_answered_db
    routing_agreement = _share(agree, routed)
    categories = {
        name: {
            "sent": c["sent"],
            "share_of_sent": _share(c["sent"], len(recorded)),
            "answers": dict(c["kinds"]),
            "model_calls_per_message": round(c["calls"] / c["sent"], 3) if c["sent"] else None,
            "cost_per_1000_messages": round(c["cost"] / c["sent"] * 1000, 4) if c["sent"] else None,
            "final_ms_p50": round(stats.percentile(c["final_ms"], 50), 1)
            if c["final_ms"]
            else None,
        }
        for name, c in sorted(by_category.items())
    }
    problems: list[str] = []
    if counts["unanswered"]:
        problems.append(f"{counts['unanswered']} unanswered")
    if counts["duplicates_seen_by_client"] or duplicates:
        problems.append(
            f"duplicate answers: {counts['duplicates_seen_by_client']} seen on streams, "
            f"{duplicates} in the database"
        )
    if counts["errors"]:
        problems.append(f"{counts['errors']} errors")
    if over_deadline_service:
        problems.append(
            f"{over_deadline_service} answers took longer than the turn deadline (by up to "
            f"{max(over_by):.1f} ms)"
        )
    if args.fault_rate and model_share is not None and model_share < TARGET_MODEL_SHARE:
        problems.append(f"answered by a model {model_share:.2%} < target {TARGET_MODEL_SHARE:.1%}")
    if not args.fault_rate and kinds["canned"]:
        problems.append(f"{kinds['canned']} canned answers without any fault injected")
    if counts["not_in_db"]:
        problems.append(f"{counts['not_in_db']} messages not found in the database")
    return {
        "scenario": NAME,
        "created_at": result_files.now_iso(),
        "parameters": {
            "rate": args.rate,
            "duration_s": args.duration,
            "fault_rate": args.fault_rate,
            "fault_kinds": args.fault_kinds,
            "simulator_fault_config": fault_rates,
            "retry_after_s": args.retry_after,
            "mix": _mix(args.mix),
            "zh_share": args.zh_share,
            "messages_per_conversation": args.messages_per_conversation,
            "conversation_cap": conversation_cap(args),
            "chains": args.chains,
            "providers": args.providers,
            "provider_max_concurrency": args.provider_max_concurrency,
            "tiers": facts["tiers"],
            "prices_per_mtok": {"sim-cheap": args.cheap_price, "sim-premium": args.premium_price},
            "sim_first_token_ms": args.sim_first_token_ms,
            "sim_tps": args.sim_tps,
            "reply_tokens": args.reply_tokens,
            "db": args.db,
            "arrival": args.arrival,
            "seed": args.seed,
            "warmup": args.warmup,
            "drain_timeout_s": args.drain_timeout,
            "turn_deadline_s": deadline_s,
            "hedge_after_s": facts["hedge_after_seconds"],
            "specialists": facts["specialists"],
            "tag": args.tag,
            "service_config_overrides": str(args.service_config) if args.service_config else None,
        },
        "environment": result_files.environment(),
        "service_code": m["service_code"],
        "rate_sent": round(len(msgs) / args.duration, 2),
        "messages_per_s_answered_shifted": round(finals_shifted / args.duration, 2),
        "latency_ms": {
            "first_delta": stats.summarize(first_ms),
            "final": stats.summarize(final_ms),
            "service_turn": stats.summarize(db_latency),
            "final_minus_service_turn": stats.summarize(before_turn),
            "final_p50_by_third_of_load": thirds,
            # model answers of one specialist vs several (a multi-part question)
            "by_parts": {
                shape: {k: stats.summarize(v) for k, v in figures.items()}
                for shape, figures in by_parts.items()
            },
        },
        "turn_deadline": {
            "seconds": deadline_s,
            "final_p99_ms": round(final_p99, 1) if not math.isnan(final_p99) else None,
            "p99_within": bool(final_ms) and final_p99 <= deadline_s * 1000,
            "finals_after_deadline_client": over_deadline_client,
            "turns_over_deadline_service": over_deadline_service,
            "turns_over_deadline_max_overrun_ms": round(max(over_by), 1) if over_by else None,
        },
        "simulator_baseline_ms": {
            "first_token": stats.summarize(m["baseline"]),
            "failures": m["baseline_failures"],
        },
        "answers": {
            "recorded": n,
            "by_kind": dict(kinds),
            "no_model_call_share": _share(no_model, n),
            "faq_share": _share(kinds["faq"], n),
            "answered_by_model_or_faq_share_of_sent": model_share,
            "canned_share_of_sent": _share(kinds["canned"], len(msgs)),
            "partly_degraded_turns": partial,
            "canned_turn_call_outcomes": dict(canned_outcomes.most_common()),
            "canned_turns_with_a_specialist_never_called": canned_no_attempt,
            "partly_degraded_share": _share(partial, n),
            "target_model_share": TARGET_MODEL_SHARE if args.fault_rate else None,
            "tier_of_answer": {k: _share(v, n) for k, v in tiers.most_common()},
            "tier_counts": dict(tiers),
            "answering_model": {k: _share(v, n) for k, v in answer_models.most_common()},
            "multi_specialist_share": _share(sum(v for k, v in spec_counts.items() if k > 1), n),
            "specialists_per_turn": {str(k): v for k, v in sorted(spec_counts.items())},
            "routing_stage": dict(stages),
            "routing_primary_matches_category": routing_agreement,
        },
        "model_calls": {
            "per_message": round(sum(purposes.values()) / n, 3) if n else None,
            "per_message_by_purpose": {
                p: round(purposes[p] / n, 3) if n else None
                for p in (*PURPOSES, *sorted(set(purposes) - set(PURPOSES)))
            },
            "by_outcome": dict(outcomes.most_common()),
            "by_model_and_outcome": dict(call_models.most_common()),
            "simulator_requests": m["sim_stats"].get("requests"),
            "simulator_faults": m["sim_stats"].get("faults"),
        },
        "cost": {
            "total": round(cost_total, 6),
            "per_1000_messages": round(cost_total / n * 1000, 4) if n else None,
            "swarmdesk_costs": m["costs_table"],
        },
        "categories": categories,
        # What the service did in its slowest turns and in a few canned ones.
        "examples": {
            "slowest_turns": [e for _, e in sorted(examples["slowest"], key=lambda t: -t[0])[:5]],
            "canned_turns": [e for _, e in examples["canned"]],
        },
        "cpu": {
            "window_s": round(wall, 2),
            "service_core_share": round(cpu["service"] / wall, 3),
            "service_s_per_1000_messages": round(cpu["service"] / len(answered) * 1000, 2)
            if answered
            else None,
            "simulator_core_share": round(cpu["simulator"] / wall, 3),
            "loadgen_core_share": round(cpu["loadgen"] / wall, 3),
            "machine_busy_cores": round(m["machine_busy_s"] / wall, 3),
            "other_processes_cores": round(
                max(0.0, m["machine_busy_s"] - sum(cpu.values())) / wall, 3
            ),
            "other_processes_cores_before": round(m["other_cores_before"], 3),
        },
        "memory_mb": {"service_peak_rss": m["rss"].peak_mb("service")},
        "counts": counts,
        "client": {
            "send_lag_ms": stats.summarize(lag_ms),
            "drain_s": round(end - times["last_post"], 2),
        },
        **api_load.closing_keys(m, problems, wall, lag_ms),
    }


def _example(x: api_load.Msg, rec: Record, answer: dict[str, Any]) -> dict[str, Any]:
    routing = rec.routing or {}
    return {
        "text": x.text,
        "final_ms": x.ms(x.final),
        "turn_ms": answer["latency_ms"],
        "answer": str(answer["text"] or "")[:300],
        "specialists": routing.get("specialists"),
        "specialist_results": routing.get("specialist_results"),
        "calls": [
            {k: c[k] for k in ("specialist", "purpose", "model", "outcome", "latency_ms")}
            for c in rec.calls
        ],
    }


# --- output -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _summary(r: dict[str, Any], files: Sequence[Path]) -> str:
    p, c, a, mc = r["parameters"], r["counts"], r["answers"], r["model_calls"]
    lat, dl, cpu = r["latency_ms"], r["turn_deadline"], r["cpu"]
    faults = (
        f"{p['fault_rate']:.0%} of simulator calls faulty ({p['fault_kinds']})"
        if p["fault_rate"]
        else "no faults"
    )
    purposes = ", ".join(f"{k} {v}" for k, v in mc["per_message_by_purpose"].items())
    tiers = ", ".join(f"{k} {_pct(v)}" for k, v in a["tier_of_answer"].items())
    models = ", ".join(f"{k} {_pct(v)}" for k, v in a["answering_model"].items())
    mix = ", ".join(f"{k} {v:g}" for k, v in p["mix"].items())
    lines = [
        "",
        f"== swarmdesk bench orchestration: {p['db']}, {p['rate']:g} msg/s for "
        f"{p['duration_s']:g} s ({p['arrival']}), {faults} ==",
        f"mix {mix}; {p['zh_share']:.0%} Chinese; {p['messages_per_conversation']} messages per "
        f"conversation; chains {p['chains']}: {p['tiers']}; provider max_concurrency "
        f"{p['provider_max_concurrency'] or 'service default'}; simulator "
        f"{p['sim_first_token_ms']:g} ms to first token, {p['sim_tps']:g} tok/s, "
        f"{p['reply_tokens']} tokens; service code {r['service_code']['source']} "
        f"{r['service_code'].get('commit')} ({r['service_code'].get('uncommitted_files', 0)} "
        "uncommitted files)",
        f"sent {c['sent']} ({r['rate_sent']:g}/s), answered {c['answered']}, unanswered "
        f"{c['unanswered']}, duplicates {c['duplicates_seen_by_client']} (db "
        f"{c['duplicates_in_db']}), errors {c['errors']}, handed off "
        f"{c['conversations_handed_off']}, queued behind a busy conversation "
        f"{c['sent_to_busy_conversation']}, stream reconnects {c['stream_reconnects']}, answers "
        f"whose deltas were missed {c['answered_without_delta_by_kind'] or 0}",
        f"messages/s answered {r['messages_per_s_answered_shifted']:g} (window shifted by the "
        f"median reply time); final p50 by third of the load {lat['final_p50_by_third_of_load']}",
        "",
        report.latency_header("latency, ms from POST sent", 30),
        _row("first delta", lat["first_delta"]),
        _row("final", lat["final"]),
        *(
            _row(f"  {shape}-part {k.replace('_', ' ')}", s)
            for shape, figures in lat.get("by_parts", {}).items()
            for k, s in figures.items()
        ),
        _row("service turn (db latency_ms)", lat["service_turn"]),
        _row("final - service turn", lat["final_minus_service_turn"]),
        _row("simulator first token (direct)", r["simulator_baseline_ms"]["first_token"]),
        "",
        f"turn deadline {dl['seconds']:g} s: final p99 {report.fmt_ms(dl['final_p99_ms'])} ms "
        f"({'within' if dl['p99_within'] else 'NOT within'}); finals after the deadline "
        f"{dl['finals_after_deadline_client']}, service turns over it "
        f"{dl['turns_over_deadline_service']} (by up to "
        f"{report.fmt_ms(dl['turns_over_deadline_max_overrun_ms'])} ms)",
        f"answers: {a['by_kind']}; without any model call {_pct(a['no_model_call_share'])} "
        f"(FAQ {_pct(a['faq_share'])})",
        f"answered by a model or the FAQ, not canned: "
        f"{_pct(a['answered_by_model_or_faq_share_of_sent'])} of sent"
        + (
            f" (target >= {a['target_model_share']:.1%})"
            if a["target_model_share"] is not None
            else ""
        )
        + f"; canned {_pct(a['canned_share_of_sent'])}; turns with a degraded specialist "
        f"among model answers {a['partly_degraded_turns']} ({_pct(a['partly_degraded_share'])})",
        f"tier of the answer (routing): {tiers}; answering model: {models}",
        f"multi-specialist turns {_pct(a['multi_specialist_share'])} "
        f"(specialists per turn {a['specialists_per_turn']}); routing stage "
        f"{a['routing_stage']}; primary intent = drawn category "
        f"{_pct(a['routing_primary_matches_category'])}",
        f"model calls per message {mc['per_message']}: {purposes}",
        f"call outcomes {mc['by_outcome']}; simulator faults {mc['simulator_faults']}",
        f"canned turns: their calls ended {a['canned_turn_call_outcomes'] or '-'}; with a "
        "specialist that got no model call at all "
        f"{a['canned_turns_with_a_specialist_never_called']}",
        f"cost per 1,000 messages {r['cost']['per_1000_messages']} (total "
        f"{r['cost']['total']:.4f} for {a['recorded']} answers)",
        "by category: "
        + "; ".join(
            f"{k} {v['sent']} ({_pct(v['share_of_sent'])}) calls/msg "
            f"{v['model_calls_per_message']} cost/1000 {v['cost_per_1000_messages']} "
            f"final p50 {v['final_ms_p50']} ms"
            for k, v in r["categories"].items()
        ),
        f"service CPU {cpu['service_core_share']:.0%} of a core "
        f"({report.fmt_ms(cpu['service_s_per_1000_messages'])} CPU-s per 1000 answers), "
        f"simulator {cpu['simulator_core_share']:.0%}, load generator "
        f"{cpu['loadgen_core_share']:.0%}; other processes {cpu['other_processes_cores']:.2f} "
        f"cores ({cpu['other_processes_cores_before']:.2f} just before); service RSS peak "
        f"{r['memory_mb']['service_peak_rss']:g} MB; send lag p99 "
        f"{report.fmt_ms(r['client']['send_lag_ms']['p99'])} ms",
        *_slowest_line(r),
        "",
        "swarmdesk costs (the load's ledger):",
        *("  " + line for line in str(r["cost"]["swarmdesk_costs"]).splitlines()),
    ]
    log = r["service_log"]
    if log["counts"]:
        top = report.log_counts(log, 8)
        lines.append(f"service log: {top}")
        for line in log["excerpt"][:3]:
            lines.append(f"  log: {line[:300]}")
    else:
        lines.append("service log: no warnings or errors")
    return "\n".join(lines + report.summary_tail(r, files))


def _row(label: str, s: dict[str, Any]) -> str:
    """A row of the latency table, as wide as the api scenario's."""
    return report.latency_row(label, s, 30)


def _slowest_line(r: dict[str, Any]) -> list[str]:
    slowest = r["examples"]["slowest_turns"]
    if not slowest:
        return []
    e = slowest[0]
    trail = ", ".join(
        f"{c['specialist'] or '-'}/{c['purpose']}/{c['model']} {c['outcome']} "
        f"{report.fmt_ms(c['latency_ms'])} ms"
        for c in e["calls"]
    )
    return [f"slowest turn {report.fmt_ms(e['turn_ms'])} ms: {e['text']!r}; calls: {trail}"]


def _plot(result: dict[str, Any], m: dict[str, Any], path: Path) -> None:
    plt = plots.pyplot()
    load: MixLoad = m["load"]
    db: dict[int, Record] = m["db"]
    start = m["times"]["start"]
    deadline_ms = result["turn_deadline"]["seconds"] * 1000
    canned = load.degraded_texts
    answered = [x for x in load.msgs if x.final is not None]
    p = result["parameters"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4))
    fault = f", {p['fault_rate']:.0%} faults" if p["fault_rate"] else ""
    fig.suptitle(
        f"swarmdesk orchestration: {p['db']}, {p['rate']:g} msg/s for {p['duration_s']:g} s"
        f"{fault}; sim {p['sim_first_token_ms']:g} ms first token, {p['sim_tps']:g} tok/s; "
        f"cost/1000 msgs {result['cost']['per_1000_messages']}"
    )
    ax = axes[0]
    series = {
        "simulator first token (direct)": m["baseline"],
        "first delta": [v for x in answered if (v := x.ms(x.first_delta)) is not None],
        "final": [v for x in answered if (v := x.ms(x.final)) is not None],
    }
    plots.plot_percentiles(ax, series, "ms after the POST was sent")
    ax.axhline(deadline_ms, color="r", linestyle="--", label="turn deadline")
    ax.set_yscale("log")
    ax.set_title("latency by percentile")
    ax.legend(fontsize=8)

    ax = axes[1]
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for x in answered:
        rec = db.get(x.message_id) if x.message_id is not None else None
        kind = _answer_kind(rec, canned) if rec is not None else "none"
        xs, ys = groups.setdefault(kind, ([], []))
        xs.append(x.sent - start)
        ys.append(x.ms(x.final) or 0.0)
    colours = {"model": "tab:blue", "faq": "tab:green", "canned": "tab:red", "none": "k"}
    for kind, (xs, ys) in sorted(groups.items()):
        ax.scatter(xs, ys, s=4, c=colours.get(kind, "k"), label=f"{kind} ({len(xs)})")
    ax.axhline(deadline_ms, color="r", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("s since the load started (send time)")
    ax.set_ylabel("ms to the final answer")
    ax.set_title("final latency by send time and answer kind")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[2]
    cats = list(result["categories"].items())
    names = [k for k, _ in cats]
    calls = [v["model_calls_per_message"] or 0 for _, v in cats]
    costs = [v["cost_per_1000_messages"] or 0 for _, v in cats]
    xs = list(range(len(names)))
    ax.bar([i - 0.2 for i in xs], calls, width=0.4, label="model calls per message")
    ax.set_xticks(xs, names)
    ax.set_ylabel("model calls per message")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in xs], costs, width=0.4, color="tab:orange", label="cost / 1000 msgs")
    ax2.set_ylabel("cost per 1,000 messages")
    ax.set_title("by category")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, ["model calls per message", "cost per 1,000 messages"], fontsize=8)
    plots.save_figure(plt, fig, path)
