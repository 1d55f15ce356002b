"""`swarmdesk route "text"` and `swarmdesk eval-routing FILE.jsonl`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

from orchestration.llm.registry import ModelRegistry
from orchestration.routing.decision import RoutingDecision, RoutingTrace
from orchestration.routing.router import Router, describe_hit

# The application's settings loader and model registry (bot.cli passes them in:
# orchestration never imports bot).
LoadSettings = Callable[[argparse.Namespace], Any]  # -> bot.settings.Settings
OpenModels = Callable[[Any], AbstractAsyncContextManager[ModelRegistry]]


def register_cli(subparsers: Any, *, load_settings: LoadSettings, open_models: OpenModels) -> None:
    """Add `route` and `eval-routing` to the `swarmdesk` command's subparsers."""
    r = subparsers.add_parser("route", help="route one message and explain the decision")
    r.add_argument("text", help="the shopper's message")
    r.add_argument("--llm", action="store_true", help="ask the cheap tier when unsure")
    r.add_argument("--sticky-tier", choices=["cheap", "premium"], help="the conversation's tier")
    r.add_argument("--json", action="store_true", help="print the decision as JSON only")
    r.set_defaults(func=partial(cmd_route, load_settings=load_settings, open_models=open_models))

    e = subparsers.add_parser("eval-routing", help="score the router on a labeled JSONL file")
    e.add_argument("file", help="JSONL: text, intents, tier, escalate per line")
    e.add_argument("--llm", action="store_true", help="ask the cheap tier when unsure")
    e.add_argument("--json", dest="json_out", metavar="OUT", help="write the figures here")
    e.add_argument("--mistakes", type=int, default=0, metavar="N", help="list the first N mistakes")
    e.set_defaults(
        func=partial(cmd_eval_routing, load_settings=load_settings, open_models=open_models)
    )


def _load(args: argparse.Namespace, load_settings: LoadSettings) -> tuple[Any, Router]:
    settings = load_settings(args)
    return settings, Router(settings.routing)


async def _with_models(settings: Any, open_models: OpenModels, run: Any) -> Any:
    """Run `run(llm)` with a classifier over the configured cheap tier (or the simulator)."""
    from orchestration.routing.llm import registry_classifier

    async with open_models(settings) as models:
        return await run(registry_classifier(models, max_tokens=settings.routing.llm_max_tokens))


def cmd_route(
    args: argparse.Namespace, *, load_settings: LoadSettings, open_models: OpenModels
) -> int:
    settings, router = _load(args, load_settings)

    async def run(llm: Any) -> tuple[RoutingDecision, list[Any], RoutingTrace]:
        return await router.route_traced(args.text, sticky_tier=args.sticky_tier, llm=llm)

    if args.llm:
        decision, records, trace = asyncio.run(_with_models(settings, open_models, run))
    else:
        decision, records, trace = asyncio.run(run(None))
    if args.json:
        print(json.dumps(decision.as_json(), ensure_ascii=False, indent=2))
        return 0
    print(explain(router, decision, trace, records))
    return 0


def explain(router: Router, d: RoutingDecision, trace: RoutingTrace, records: list[Any]) -> str:
    lines = [
        f"intents     {', '.join(d.intents)}   (primary {d.primary}, "
        f"confidence {d.confidence:.2f})",
        f"stage       {d.stage}",
        f"tier        {d.tier}",
        f"escalate    {'yes' if d.escalate else 'no'}",
        f"sentiment   {d.sentiment}, complexity {d.complexity}",
        f"latency     {d.latency_ms * 1000:.0f} µs",
        "",
        f"normalised  {trace.normalized!r}"
        + (
            f" -> {trace.masked!r} (denied topics removed)"
            if trace.masked != trace.normalized
            else ""
        ),
        f"language    {trace.language}",
    ]
    if trace.rule_hits:
        hits = "\n            ".join(describe_hit(h) for h in trace.rule_hits)
        lines.append(f"rules       {hits}")
    else:
        lines.append("rules       none matched")
    if trace.faq:
        answered = "answered directly" if d.faq_answer else "not used: not a plain question"
        lines.append(f"faq         {trace.faq} (matched '{trace.faq_matched}'), {answered}")
        if d.faq_answer:
            lines.append(f"            {d.faq_answer}")
    top = ", ".join(f"{lb} {p:.2f}" for lb, p in trace.classifier[:3])
    lines.append(f"classifier  {top}")
    if trace.fused != trace.classifier:
        lines.append("with rules  " + ", ".join(f"{lb} {p:.2f}" for lb, p in trace.fused[:3]))
    for clause, label, p, ruled in trace.clauses:
        lines.append(f"  clause    {clause!r}: {label} {p:.2f}{' (rule)' if ruled else ''}")
    if trace.signals:
        lines.append(
            "signals     " + ", ".join(f"{k} '{v}'" for k, v in sorted(trace.signals.items()))
        )
    if d.reasons:
        lines.append("why         " + "\n            ".join(d.reasons))
    else:
        lines.append("why         cheap: a simple question, calm shopper")
    if d.stage != "llm" and d.confidence < router.settings.llm_below:
        lines.append(
            f"note        confidence below {router.settings.llm_below:g}: with an LLM "
            "(--llm, or in the service) the cheap tier would classify this message"
        )
    if trace.llm_text is not None:
        lines.append(f"llm answer  {trace.llm_text}")
    if trace.llm_error:
        lines.append(f"llm         failed, local decision kept: {trace.llm_error}")
    for rec in records:
        lines.append(
            f"llm call    {rec.provider}/{rec.model} {rec.outcome}, "
            f"{rec.input_tokens}+{rec.output_tokens} tokens, cost {rec.cost:.6f}"
        )
    return "\n".join(lines)


def cmd_eval_routing(
    args: argparse.Namespace, *, load_settings: LoadSettings, open_models: OpenModels
) -> int:
    from orchestration.routing.evaluate import (
        LabeledFileError,
        evaluate,
        format_report,
        load_labeled,
    )

    settings, router = _load(args, load_settings)
    try:
        rows = load_labeled(Path(args.file), router.labels)
    except LabeledFileError as e:
        print(f"eval-routing: {e}", file=sys.stderr)
        return 2

    async def run(llm: Any) -> Any:
        return await evaluate(router, rows, llm)

    report = asyncio.run(_with_models(settings, open_models, run) if args.llm else run(None))
    print(format_report(report, show_mistakes=args.mistakes))
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(report.as_json(), ensure_ascii=False, indent=2), encoding="utf-8"
        )
        print(f"figures written to {args.json_out}")
    return 0
