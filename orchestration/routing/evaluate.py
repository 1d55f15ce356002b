"""`swarmdesk eval-routing`: score the router on a labeled JSONL file.

A line is `{"text": ..., "intents": [primary, ...], "tier": "cheap"|"premium",
"escalate": bool}` (`id` and `lang` optional; `tier`/`escalate` may be left out, and then
are not scored for that line).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestration.events import CallRecord
from orchestration.routing.decision import RoutingDecision
from orchestration.routing.llm import LlmClassify
from orchestration.routing.router import Router


class LabeledFileError(ValueError):
    """A labeled file that can't be scored; the message names the line."""


@dataclass(frozen=True, slots=True)
class Labeled:
    id: str
    text: str
    intents: tuple[str, ...]
    tier: str | None
    escalate: bool | None
    lang: str | None


def load_labeled(path: Path, labels: tuple[str, ...]) -> list[Labeled]:
    rows: list[Labeled] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LabeledFileError(f"{path}: file not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise LabeledFileError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise LabeledFileError(f"{where}: expected a JSON object per line")
        text, intents = obj.get("text"), obj.get("intents")
        if not isinstance(text, str):
            raise LabeledFileError(f"{where}: 'text' must be a string")
        if (
            not isinstance(intents, list)
            or not intents
            or not all(isinstance(i, str) for i in intents)
        ):
            raise LabeledFileError(f"{where}: 'intents' must be a non-empty list of labels")
        unknown = [i for i in intents if i not in labels]
        if unknown:
            raise LabeledFileError(
                f"{where}: unknown intent(s) {unknown}; the router knows {', '.join(labels)}"
            )
        tier, esc = obj.get("tier"), obj.get("escalate")
        if tier is not None and tier not in ("cheap", "premium"):
            raise LabeledFileError(f"{where}: 'tier' must be 'cheap' or 'premium'")
        if esc is not None and not isinstance(esc, bool):
            raise LabeledFileError(f"{where}: 'escalate' must be true or false")
        lang = obj.get("lang")
        rows.append(
            Labeled(
                str(obj.get("id", n)),
                text,
                tuple(intents),
                tier,
                esc,
                lang if isinstance(lang, str) else None,
            )
        )
    if not rows:
        raise LabeledFileError(f"{path}: no labeled lines")
    return rows


@dataclass
class Report:
    messages: int
    primary_accuracy: float
    intent_f1: float  # micro-averaged over (message, intent) pairs
    intent_precision: float
    intent_recall: float
    tier_accuracy: float | None
    escalation_recall: float | None
    escalation_precision: float | None
    no_model_share: float  # decided by rules, FAQ or the classifier
    stages: dict[str, int]
    latency_us_p50: float  # local stages, per message
    latency_us_p99: float
    llm_calls: int = 0
    llm_cost: float = 0.0
    # The confidence trade-off of the local decision at `threshold` (routing.llm_below):
    # the share decided locally, the primary accuracy there, and on the rest (which the
    # cheap tier classifies when an LLM is configured).
    threshold: float = 0.0
    confident_share: float = 1.0
    confident_accuracy: float = 0.0
    unsure_accuracy: float | None = None
    per_language: dict[str, float] = field(default_factory=dict)  # primary accuracy
    per_intent: dict[str, dict[str, float]] = field(default_factory=dict)  # P/R/F1 of sets
    worst_intents: list[dict[str, Any]] = field(default_factory=list)
    mistakes: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def evaluate(router: Router, rows: list[Labeled], llm: LlmClassify | None = None) -> Report:
    decisions: list[RoutingDecision] = []
    locals_: list[RoutingDecision] = []
    latencies: list[float] = []
    records: list[CallRecord] = []
    paid: list[bool] = []  # a model was called for this message (even if it failed)
    router.route_local(rows[0].text)  # warm-up: the first call pays one-off costs
    for row in rows:
        # The local stages timed on their own, so the figure means the same with --llm.
        started = time.perf_counter()
        local = router.route_local(row.text)
        latencies.append((time.perf_counter() - started) * 1e6)
        locals_.append(local)
        if llm is None:
            decisions.append(local)
            paid.append(False)
        else:
            d, recs = await router.route(row.text, llm=llm)
            decisions.append(d)
            records.extend(recs)
            paid.append(bool(recs) or d.stage == "llm")
    report = score(rows, decisions, latencies, records, paid)
    trade_off(report, rows, locals_, router.settings.llm_below)
    return report


def trade_off(
    report: Report, rows: list[Labeled], local: list[RoutingDecision], threshold: float
) -> None:
    """Coverage and accuracy of the local decision above and below the LLM threshold."""
    sure = [
        d.primary == r.intents[0]
        for r, d in zip(rows, local, strict=True)
        if d.confidence >= threshold
    ]
    unsure = [
        d.primary == r.intents[0]
        for r, d in zip(rows, local, strict=True)
        if d.confidence < threshold
    ]
    report.threshold = threshold
    report.confident_share = len(sure) / len(rows)
    report.confident_accuracy = sum(sure) / len(sure) if sure else 0.0
    report.unsure_accuracy = sum(unsure) / len(unsure) if unsure else None


def score(
    rows: list[Labeled],
    decisions: list[RoutingDecision],
    latencies: list[float],
    records: list[CallRecord],
    paid: list[bool],
) -> Report:
    n = len(rows)
    primary_ok = tp = fp = fn = 0
    tier_n = tier_ok = 0
    esc_tp = esc_fp = esc_fn = 0
    stages: Counter[str] = Counter()
    by_lang: dict[str, list[int]] = {}
    per_intent: dict[str, Counter[str]] = {}
    sets: dict[str, list[int]] = {}  # intent -> [tp, fp, fn] over intent sets
    mistakes = []
    for row, d in zip(rows, decisions, strict=True):
        stages[d.stage] += 1
        ok = d.intents[0] == row.intents[0]
        primary_ok += ok
        lang = by_lang.setdefault(row.lang or "?", [0, 0])
        lang[0] += ok
        lang[1] += 1
        per_intent.setdefault(row.intents[0], Counter())[d.intents[0]] += 1
        gold, got = set(row.intents), set(d.intents)
        for lb in gold | got:
            c = sets.setdefault(lb, [0, 0, 0])
            c[0 if lb in gold and lb in got else 1 if lb in got else 2] += 1
        tp += len(gold & got)
        fp += len(got - gold)
        fn += len(gold - got)
        tier_bad = False
        if row.tier is not None:
            tier_n += 1
            tier_ok += d.tier == row.tier
            tier_bad = d.tier != row.tier
        esc_bad = False
        if row.escalate is not None:
            esc_tp += row.escalate and d.escalate
            esc_fp += (not row.escalate) and d.escalate
            esc_fn += row.escalate and not d.escalate
            esc_bad = row.escalate != d.escalate
        if not ok or gold != got or tier_bad or esc_bad:
            mistakes.append(
                {
                    "id": row.id,
                    "text": row.text,
                    "want": {
                        "intents": list(row.intents),
                        "tier": row.tier,
                        "escalate": row.escalate,
                    },
                    "got": d.as_json(),
                }
            )
    worst: list[dict[str, Any]] = []
    for label, answers in per_intent.items():
        total = sum(answers.values())
        confused = [(lb, c) for lb, c in answers.most_common() if lb != label][:2]
        worst.append(
            {
                "intent": label,
                "messages": total,
                "accuracy": answers[label] / total,
                "confused_with": {lb: c for lb, c in confused},
            }
        )
    worst.sort(key=lambda w: (float(w["accuracy"]), -int(w["messages"])))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return Report(
        messages=n,
        primary_accuracy=primary_ok / n,
        intent_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        intent_precision=precision,
        intent_recall=recall,
        tier_accuracy=tier_ok / tier_n if tier_n else None,
        escalation_recall=esc_tp / (esc_tp + esc_fn) if esc_tp + esc_fn else None,
        escalation_precision=esc_tp / (esc_tp + esc_fp) if esc_tp + esc_fp else None,
        no_model_share=(n - sum(paid)) / n,
        stages=dict(stages),
        latency_us_p50=_pct(latencies, 0.5),
        latency_us_p99=_pct(latencies, 0.99),
        llm_calls=len(records),
        llm_cost=sum(r.cost for r in records),
        per_language={k: v[0] / v[1] for k, v in sorted(by_lang.items())},
        per_intent={lb: _prf(*c) for lb, c in sorted(sets.items())},
        worst_intents=worst,
        mistakes=mistakes,
    )


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def format_report(r: Report, *, show_mistakes: int = 0) -> str:
    lines = [
        f"messages                  {r.messages}",
        f"primary-intent accuracy   {_fmt(r.primary_accuracy)}",
        f"intent set F1 (micro)     {_fmt(r.intent_f1)}"
        f"  (precision {_fmt(r.intent_precision)}, recall {_fmt(r.intent_recall)})",
        f"tier accuracy             {_fmt(r.tier_accuracy)}",
        f"escalation recall         {_fmt(r.escalation_recall)}"
        f"  (precision {_fmt(r.escalation_precision)})",
        f"decided without a model   {_fmt(r.no_model_share)}"
        f"  ({', '.join(f'{k} {v}' for k, v in sorted(r.stages.items()))})",
        f"routing latency (local)   p50 {r.latency_us_p50:.0f} µs, p99 {r.latency_us_p99:.0f} µs",
    ]
    lines.append(
        f"confidence >= {r.threshold:g}        {_fmt(r.confident_share)} of messages, primary "
        f"accuracy {_fmt(r.confident_accuracy)}; below: {_fmt(r.unsure_accuracy)} locally "
        "(the cheap tier classifies these with --llm)"
    )
    if r.llm_calls:
        lines.append(f"LLM classification calls  {r.llm_calls}, cost {r.llm_cost:.6f}")
    lines.append(
        "primary accuracy by lang  "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in r.per_language.items())
    )
    lines.append(
        "intent-set F1 by intent   "
        + ", ".join(f"{k} {_fmt(v['f1'])}" for k, v in r.per_intent.items())
    )
    lines.append("worst intents (primary):")
    for w in r.worst_intents[:5]:
        conf = ", ".join(f"{lb} {c}" for lb, c in w["confused_with"].items()) or "-"
        lines.append(
            f"  {w['intent']:<13} {_fmt(w['accuracy']):>6} of {w['messages']:<4} "
            f"confused with: {conf}"
        )
    for m in r.mistakes[:show_mistakes]:
        got = m["got"]
        lines.append(
            f"  x {m['id']}: {m['text'][:70]!r}\n"
            f"      want {m['want']['intents']} {m['want']['tier']} esc={m['want']['escalate']}"
            f" | got {got['intents']} {got['tier']} esc={got['escalate']} ({got['stage']})"
        )
    return "\n".join(lines)
