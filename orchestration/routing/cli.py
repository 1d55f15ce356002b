"""`swarmdesk route "text"`, `swarmdesk eval-routing FILE.jsonl` and `swarmdesk routing
train`."""

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
# The examples people labeled in the console (storage/routing_examples.py), as JSONL lines.
StoredExamples = Callable[[Any], list[dict[str, Any]]]


def register_cli(
    subparsers: Any,
    *,
    load_settings: LoadSettings,
    open_models: OpenModels,
    stored_examples: StoredExamples | None = None,
) -> None:
    """Add `route`, `eval-routing` and `routing train` to the `swarmdesk` command."""
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

    g = subparsers.add_parser("routing", help="the routing model: train it")
    gsub = g.add_subparsers(dest="routing_command", required=True)
    t = gsub.add_parser(
        "train",
        help="retrain the routing model on the corpus, the config's examples, your files "
        "and what agents labeled",
    )
    t.add_argument(
        "--add", action="append", default=[], metavar="FILE.jsonl", help="more labeled lines"
    )
    t.add_argument("--out", metavar="PATH", help="where to write the model (default: see below)")
    t.add_argument("--no-stored", action="store_true", help="leave out the examples agents labeled")
    t.add_argument(
        "--export-stored", metavar="OUT.jsonl", help="also write those examples to a file"
    )
    t.add_argument(
        "--shipped",
        action="store_true",
        help="the model shipped with swarmdesk: built-in data and corpus only (for developers)",
    )
    t.set_defaults(
        func=partial(cmd_train, load_settings=load_settings, stored_examples=stored_examples)
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


def cmd_train(
    args: argparse.Namespace,
    *,
    load_settings: LoadSettings,
    stored_examples: StoredExamples | None,
) -> int:
    from orchestration.routing.config import RoutingSettings
    from orchestration.routing.model import BUILTIN_MODEL
    from orchestration.routing.train import CorpusError, read_examples, train

    settings = load_settings(args)
    routing: RoutingSettings = RoutingSettings() if args.shipped else settings.routing
    router = Router(routing, untrained=True)
    try:
        labeled = read_examples() if routing.builtin else []
        for name in args.add:
            labeled += read_examples(Path(name))
    except CorpusError as e:
        print(f"routing train: {e}", file=sys.stderr)
        return 2
    stored: list[dict[str, Any]] = []
    if stored_examples is not None and not args.shipped and not args.no_stored:
        stored = stored_examples(settings)
    if args.export_stored:
        Path(args.export_stored).write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in stored), "utf-8"
        )
    if stored:
        from orchestration.routing.train import Example

        labeled += [
            Example(s["text"], tuple(s["intents"]), s.get("tier"), s.get("escalate"))
            for s in stored
        ]
    pairs = [(text, name) for name, spec in router.data.intents.items() for text in spec.examples]
    model = train(pairs, labeled, featurize=router.text_features, labels=router.labels)
    if args.out:
        out = Path(args.out)
    elif args.shipped:
        out = Path(__file__).parent / BUILTIN_MODEL
    else:
        out = Path(routing.model or "routing-model.npz")
    model.save(out)
    meta = model.meta
    print(
        f"trained on {meta['examples']} intent examples and {meta['labeled']} labeled lines "
        f"({len(stored)} from agents); escalate at p >= {meta['escalate_at']:.2f}, "
        f"premium at p >= {meta['premium_at']:.2f}"
    )
    print(f"model written to {out}")
    if not args.shipped and routing.model is None:
        print(f"use it: set `routing: {{model: {out}}}` in your swarmdesk.yaml")
    return 0
