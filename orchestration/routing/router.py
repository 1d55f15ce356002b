"""The router: rules and FAQ, then the local classifier, then (only if unsure) an LLM.

Rules are evidence, not verdicts: a matching rule adds `weight` to the log-odds of its
intent on top of the classifier's calibrated probability, so two conflicting rules fall
back to what the classifier prefers, and a rule that agrees with it makes it sure.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from orchestration.events import CallRecord
from orchestration.language import language
from orchestration.llm.types import LLMError
from orchestration.routing.config import RoutingData, RoutingSettings
from orchestration.routing.decision import RoutingDecision, RoutingTrace
from orchestration.routing.llm import LlmClassify, LlmVerdict, classify_messages, parse_verdict
from orchestration.routing.matchers import (
    CompiledFaq,
    CompiledRule,
    CompiledSignals,
    Found,
    KeywordIndex,
    RuleHit,
)
from orchestration.routing.model import RoutingModel
from orchestration.routing.text import clauses, features, normalize, visible_length

_FAQ_WEIGHT = 4.0
_FAQ_WEIGHT_ALONE = 10.0
# Confidence given to an LLM verdict (it states no probability of its own).
_LLM_CONFIDENCE = 0.8
_MAX_INTENTS = 3
_GUESS_MIN = 0.3
_ESCALATE_SURE = 0.5
_ASKED_MIN = 0.25
_TASKS = frozenset({"logistics", "order_status", "refund", "product", "discount"})
_MODEL_TIER = _TASKS | {"other"}


class Router:
    def __init__(self, settings: RoutingSettings, *, untrained: bool = False) -> None:
        """`untrained`: no model (every intent equally likely) - what training starts from."""
        self.settings = settings
        data: RoutingData = settings.resolved()
        self.data = data
        self.labels = tuple(data.intents)
        self.index = KeywordIndex()
        self.rules = [CompiledRule(r, self.index) for r in data.rules]
        self.faq = [CompiledFaq(f, self.index) for f in data.faq]
        self.signals = CompiledSignals(data.signals, self.index)
        self.index.build()
        self.descriptions = {name: spec.description for name, spec in data.intents.items()}
        started = time.perf_counter()
        self.classifier = (
            RoutingModel.empty(self.labels) if untrained else self._model(settings, data)
        )
        self.training_ms = (time.perf_counter() - started) * 1000

    def _model(self, settings: RoutingSettings, data: RoutingData) -> RoutingModel:
        """The shop's trained file, else the shipped model; a config that adds examples or
        intents of its own is trained at start-up (once per process and config)."""
        if settings.model is not None:
            return _loaded(settings.model)
        own = any(spec.examples for spec in settings.intents.values())
        if settings.builtin and not own:
            return _loaded(None)
        key = settings.model_dump_json()
        model = _TRAINED.get(key)
        if model is None:
            from orchestration.routing.train import read_examples, train

            pairs = [(t, name) for name, spec in data.intents.items() for t in spec.examples]
            labeled = read_examples() if settings.builtin else []
            model = train(pairs, labeled, featurize=self.text_features, labels=self.labels)
            _TRAINED[key] = model
        return model

    def prepare(self, text: str) -> str:
        """The normalised text without denied topics ("not a complaint")."""
        return self.signals.negation.sub(normalize(text)).strip()

    def text_features(self, text: str) -> list[str]:
        """What the model scores for a raw message (training uses this too)."""
        masked = self.prepare(text)
        found = self.index.scan(masked)
        hits = self._rule_hits(self.rules, masked, found)
        faq = next((f.name for f in self.faq if f.match(masked, found) is not None), None)
        return model_features(masked, hits, self.signals.found(masked, found), faq)

    # -- local stages -------------------------------------------------------------------

    def analyse(self, text: str) -> RoutingTrace:
        norm = normalize(text)
        masked = self.signals.negation.sub(norm).strip()
        trace = RoutingTrace(normalized=norm, masked=masked, language=language(text))
        found = self.index.scan(masked)
        trace.signals = self.signals.found(masked, found)
        trace.rule_hits = self._rule_hits(self.rules, masked, found)
        for faq in self.faq:
            hit = faq.match(masked, found)
            if hit is not None:
                trace.faq, trace.faq_matched = faq.name, hit
                break
        scores = self.classifier.scores(
            model_features(masked, trace.rule_hits, trace.signals, trace.faq)
        )
        trace.classifier = scores.intents
        trace.escalate_p, trace.premium_p = scores.escalate, scores.premium
        trace.mentions = scores.mentions
        trace.fused = self._fuse(trace.classifier, trace.rule_hits, trace.faq)
        parts = clauses(masked)
        if len(parts) > 1:
            # Each clause on its own: a second topic in its own clause is a second intent.
            # Only rules that matched the whole message can match a part of it.
            hit_names = {h.name for h in trace.rule_hits}
            candidates = [r for r in self.rules if r.name in hit_names]
            part_hits = [self._rule_hits(candidates, p, self.index.scan(p)) for p in parts]
            # All clauses scored in one pass over the weights.
            part_probs = self.classifier.intents_batch(
                [model_features(p, h, {}, None) for p, h in zip(parts, part_hits, strict=True)]
            )
            for part, hits, probs in zip(parts, part_hits, part_probs, strict=True):
                fused = self._fuse(probs, hits, None)
                label, p = fused[0]
                ruled = any(h.intent == label for h in hits)
                trace.clauses.append((part, label, p, ruled))
                trace.clause_probs.append(dict(fused))
        return trace

    @staticmethod
    def _rule_hits(rules: list[CompiledRule], norm: str, found: Found) -> list[RuleHit]:
        return [h for r in rules if (h := r.match(norm, found)) is not None]

    def _fuse(
        self, probs: list[tuple[str, float]], hits: list[RuleHit], faq_name: str | None
    ) -> list[tuple[str, float]]:
        """Classifier probabilities with rule and FAQ evidence added as log-odds. Rules the
        model was trained with are in its probabilities already and count only there; a
        shop's new rules, and FAQ phrases (precise: alone they decide), count here."""
        boost: dict[str, float] = {}
        for h in hits:
            if not self.classifier.knows("rule:" + h.name):
                boost[h.intent] = max(boost.get(h.intent, 0.0), h.weight)
        if faq_name is not None:
            intent = self._faq_by_name(faq_name).intent
            # FAQ phrases are precise: alone they decide; against another intent's rule
            # they are strong evidence only.
            alone = all(h.intent == intent for h in hits)
            weight = _FAQ_WEIGHT_ALONE if alone else _FAQ_WEIGHT
            boost[intent] = max(boost.get(intent, 0.0), weight)
        if not boost:
            return probs
        table = dict(probs)
        for intent in boost:
            table.setdefault(intent, 1e-3)  # an intent with no examples still counts
        weights = {lb: p * math.exp(boost.get(lb, 0.0)) for lb, p in table.items()}
        total = sum(weights.values())
        return sorted(((lb, w / total) for lb, w in weights.items()), key=lambda x: -x[1])

    def _primary(self, trace: RoutingTrace) -> tuple[str, float]:
        ruled = {h.intent for h in trace.rule_hits}
        label, p = trace.fused[0]
        # "human" must be asked for in so many words: a guess from character n-grams
        # alone ("扎不扎人") is not a request for a person.
        if label == "human" and label not in ruled and p < _GUESS_MIN:
            label, p = trace.fused[1]
        # Likewise a complaint needs complaint words or an upset tone, not just a vague text.
        if label == "complaint" and label not in ruled and p < _GUESS_MIN:
            if not self._upset(trace):
                label, p = trace.fused[1]
        return label, p

    def _faq_by_name(self, name: str) -> CompiledFaq:
        return next(f for f in self.faq if f.name == name)

    def route_local(self, text: str, *, sticky_tier: str | None = None) -> RoutingDecision:
        """Rules, FAQ and the classifier; no I/O."""
        started = time.perf_counter()
        trace = self.analyse(text)
        decision = self.decide(trace, sticky_tier=sticky_tier)
        return replace(decision, latency_ms=(time.perf_counter() - started) * 1000)

    def decide(self, trace: RoutingTrace, *, sticky_tier: str | None = None) -> RoutingDecision:
        primary, confidence = self._primary(trace)
        intents = self._intents(trace, primary)
        if intents[0] != primary:
            confidence = dict(trace.fused).get(intents[0], confidence)
            primary = intents[0]
        confidence = max(confidence, self._clauses_sure(trace, intents))
        sentiment = self._sentiment(trace, intents)
        escalate, esc_reasons = self._escalation(trace, intents)
        complexity, cx_reasons = self._complexity(trace, intents)
        tier, tier_reasons = self._tier(trace, intents, sentiment, complexity, sticky_tier)
        rule_intents = {h.intent for h in trace.rule_hits}
        stage = "rule" if primary in rule_intents else "classifier"
        faq_answer = None
        if trace.faq is not None:
            faq = self._faq_by_name(trace.faq)
            # A direct answer only fits a plain, single question in a calm message.
            if (
                intents == (faq.intent,)
                and sentiment in ("neutral", "positive")
                and not escalate
                and complexity == "simple"
            ):
                stage, faq_answer = "faq", faq.answer(trace.language)
        return RoutingDecision(
            intents=intents,
            confidence=confidence,
            tier=tier,
            escalate=escalate,
            sentiment=sentiment,
            complexity=complexity,
            stage=stage,
            faq_answer=faq_answer,
            reasons=tuple(esc_reasons + cx_reasons + tier_reasons),
        )

    def _intents(self, trace: RoutingTrace, primary: str) -> tuple[str, ...]:
        """Primary first, then the other tasks the message asks about, in their order."""
        cfg = self.settings
        n = len(trace.clauses)

        def asked_at(label: str) -> int:
            # Where a task found on the whole message is asked: the first clause that
            # leans to it, even if another intent tops that clause.
            return next(
                (
                    i
                    for i, probs in enumerate(trace.clause_probs)
                    if probs.get(label, 0.0) >= _ASKED_MIN
                ),
                n,
            )

        first_seen: dict[str, int] = {primary: asked_at(primary)}
        strength: dict[str, float] = {}
        for i, (_part, label, p, ruled) in enumerate(trace.clauses):
            if label == "greeting" or p < (cfg.secondary_rule_min if ruled else cfg.secondary_min):
                continue
            if label == "other" and not ruled:
                continue  # a vague clause is context, not a second task
            first_seen[label] = min(first_seen.get(label, i), i)
            strength[label] = max(strength.get(label, 0.0), p)
        # A second intent named by a rule and likely on the whole message also counts.
        named = {h.intent for h in trace.rule_hits}
        for label, p in trace.fused[1:3]:
            if p >= cfg.secondary_fused_min and label in named - {"greeting", "other"}:
                first_seen.setdefault(label, asked_at(label))
                strength.setdefault(label, p)
        # So does one the model hears in the whole message, said in passing or not.
        at = self.classifier.mentions_at
        for label, p in sorted(trace.mentions.items(), key=lambda x: -x[1]):
            if label not in first_seen and label != "greeting" and p >= at[label]:
                first_seen[label] = asked_at(label)
                strength[label] = p
        tasks = [lb for lb in first_seen if lb in _MODEL_TIER]
        if primary in _MODEL_TIER and len(tasks) > 1:
            # Several tasks: the one asked first leads (shoppers put the main thing first).
            primary = min(tasks, key=lambda lb: first_seen[lb])
        rest = sorted((lb for lb in first_seen if lb != primary), key=lambda lb: first_seen[lb])
        if primary in _TASKS and "abuse" in trace.signals:
            # Insults make it a complaint first ("快递十天没动 你们是死了吗"): the task
            # is the context, not what the shop has to answer first.
            rest = [lb for lb in rest if lb != "complaint"]
            rest.insert(0, primary)
            primary = "complaint"
        elif primary in _TASKS and self._furious(trace) and "complaint" not in rest:
            # Mild displeasure is a complaint only if the model hears one (mentions).
            rest.append("complaint")
        if "human" in rest:
            # Asking for a person decides how the whole turn is handled: it leads.
            rest.remove("human")
            rest.insert(0, primary)
            primary = "human"
        return (primary, *rest)[:_MAX_INTENTS]

    @staticmethod
    def _clauses_sure(trace: RoutingTrace, intents: tuple[str, ...]) -> float:
        """How sure the clauses are of a multi-part message's tasks: each part said clearly
        in its own clause ("where is my order? also, can I return it?") is as sure as its
        least sure part, though the whole message splits its probability between them —
        no paid classification (1–2 s before anything is shown) for a plain two-part
        question. 0 for a message of one part."""
        best: dict[str, float] = {}
        for _part, label, p, _ruled in trace.clauses:
            best[label] = max(best.get(label, 0.0), p)
        tasks = [i for i in intents if i in _TASKS and i in best]
        if len(tasks) < 2 or tasks[0] != intents[0]:
            return 0.0
        return min(best[t] for t in tasks)

    @staticmethod
    def _furious(trace: RoutingTrace) -> bool:
        return any(k in trace.signals for k in ("anger", "abuse", "threat", "sarcasm"))

    def _upset(self, trace: RoutingTrace) -> bool:
        s = trace.signals
        return any(k in s for k in ("anger", "abuse", "threat", "sarcasm", "negative"))

    def _sentiment(self, trace: RoutingTrace, intents: tuple[str, ...]) -> str:
        s = trace.signals
        if any(k in s for k in ("abuse", "anger", "threat")):
            return "angry"
        if any(k in s for k in ("negative", "sarcasm", "repeated_failure")) or (
            "complaint" in intents
        ):
            return "negative"
        if "positive" in s or intents[0] == "greeting":
            return "positive" if "positive" in s else "neutral"
        return "neutral"

    def _escalation(self, trace: RoutingTrace, intents: tuple[str, ...]) -> tuple[bool, list[str]]:
        s = trace.signals
        reasons = []
        if "human" in intents:
            reasons.append("asks for a person")
        labels = {
            "abuse": "abuse",
            "anger": "strong anger",
            "threat": "legal/regulatory or public threat",
            "safety": "safety issue",
            "account_takeover": "account takeover",
            "repeated_failure": "earlier attempts failed",
        }
        for key, label in labels.items():
            if key in s:
                reasons.append(f"{label}: '{s[key]}'")
        p = trace.escalate_p
        # The model alone decides when sure; when it only leans that way, the shopper must
        # also be upset or be asking for a person or complaining ("客服几点上班" is neither).
        leaning = p >= self.classifier.escalate_at and (
            self._upset(trace) or bool({"human", "complaint"} & set(intents))
        )
        if p >= _ESCALATE_SURE or leaning:
            reasons.append(f"the model says a person is needed (p {p:.2f})")
        return bool(reasons), [f"escalate: {r}" for r in reasons]

    def _complexity(self, trace: RoutingTrace, intents: tuple[str, ...]) -> tuple[str, list[str]]:
        s = trace.signals
        reasons = []
        if len(intents) > 1:
            reasons.append(f"{len(intents)} intents")
        for key, label in (
            ("defect", "defect claim"),
            ("dispute", "dispute"),
            ("calculation", "price calculation"),
            ("advice", "comparison/advice"),
            ("several", "several orders"),
        ):
            if key in s:
                reasons.append(f"{label}: '{s[key]}'")
        size = visible_length(trace.normalized)
        if size > self.settings.long_message:
            reasons.append(f"long message ({size} > {self.settings.long_message})")
        return ("complex" if reasons else "simple"), [f"complex: {r}" for r in reasons]

    def _tier(
        self,
        trace: RoutingTrace,
        intents: tuple[str, ...],
        sentiment: str,
        complexity: str,
        sticky: str | None,
    ) -> tuple[str, list[str]]:
        reasons = []
        if intents == ("human",) and sticky != "premium":
            # A plain request for a person: a person answers, the bot only hands over.
            return "cheap", []
        # The premium head learned from calm one-task messages only (train.py): for the
        # rest, the rules below decide.
        if trace.premium_p >= self.classifier.premium_at and intents[0] in _MODEL_TIER:
            reasons.append(f"premium: the model says it needs reasoning (p {trace.premium_p:.2f})")
        if sticky == "premium":
            reasons.append("premium: the conversation is already on premium (sticky)")
        if complexity == "complex":
            reasons.append("premium: complex")
        if sentiment in ("angry", "negative"):
            reasons.append(f"premium: {sentiment} shopper")
        if "complaint" in intents and sentiment not in ("angry", "negative"):
            reasons.append("premium: complaint")
        return ("premium" if reasons else "cheap"), reasons

    # -- with the LLM -------------------------------------------------------------------

    async def route(
        self,
        text: str,
        *,
        sticky_tier: str | None = None,
        llm: LlmClassify | None = None,
        on_unsure: Callable[[RoutingDecision], None] | None = None,
    ) -> tuple[RoutingDecision, list[CallRecord]]:
        """Route one message; ask `llm` only when the local confidence is low. Never raises
        for a model failure: the local decision stands instead. `on_unsure` gets the local
        decision just before `llm` is asked (work that can start on a guess starts then)."""
        decision, records, _trace = await self.route_traced(
            text, sticky_tier=sticky_tier, llm=llm, on_unsure=on_unsure
        )
        return decision, records

    async def route_traced(
        self,
        text: str,
        *,
        sticky_tier: str | None = None,
        llm: LlmClassify | None = None,
        on_unsure: Callable[[RoutingDecision], None] | None = None,
    ) -> tuple[RoutingDecision, list[CallRecord], RoutingTrace]:
        started = time.perf_counter()
        trace = self.analyse(text)
        local = self.decide(trace, sticky_tier=sticky_tier)
        records: list[CallRecord] = []
        if llm is None or local.stage == "faq" or local.confidence >= self.settings.llm_below:
            elapsed = (time.perf_counter() - started) * 1000
            return replace(local, latency_ms=elapsed), records, trace
        if on_unsure is not None:
            on_unsure(replace(local, latency_ms=(time.perf_counter() - started) * 1000))
        verdict: LlmVerdict | None = None
        try:
            async with asyncio.timeout(self.settings.llm_timeout_seconds):
                answer, got = await llm(classify_messages(text, self.labels, self.descriptions))
            records.extend(got if isinstance(got, list) else [got])
            trace.llm_text = answer
            verdict = parse_verdict(answer, self.labels)
            if verdict is None:
                trace.llm_error = "the model's answer is not the expected JSON"
        except TimeoutError:
            trace.llm_error = f"no answer within {self.settings.llm_timeout_seconds:g}s"
        except LLMError as e:
            records.extend(getattr(e, "records", []))
            trace.llm_error = str(e)
        elapsed = (time.perf_counter() - started) * 1000
        if verdict is None:
            return replace(local, latency_ms=elapsed), records, trace
        return self._with_llm(trace, local, verdict, sticky_tier, elapsed), records, trace

    def _with_llm(
        self,
        trace: RoutingTrace,
        local: RoutingDecision,
        verdict: LlmVerdict,
        sticky_tier: str | None,
        elapsed_ms: float,
    ) -> RoutingDecision:
        intents = verdict.intents[:_MAX_INTENTS]
        # Local signals (safety, legal threats, ...) still count: the model may miss them.
        escalate, esc_reasons = self._escalation(trace, intents)
        if verdict.needs_human and not escalate:
            esc_reasons.append("escalate: the LLM says a person is needed")
        escalate = escalate or verdict.needs_human
        sentiment = _worse(verdict.sentiment, self._sentiment(trace, intents))
        local_cx, cx_reasons = self._complexity(trace, intents)
        complexity = "complex" if "complex" in (verdict.complexity, local_cx) else "simple"
        if verdict.complexity == "complex":
            cx_reasons.append("complex: the LLM says so")
        tier, tier_reasons = self._tier(trace, intents, sentiment, complexity, sticky_tier)
        return RoutingDecision(
            intents=intents,
            confidence=max(_LLM_CONFIDENCE, local.confidence)
            if intents[0] == local.primary
            else _LLM_CONFIDENCE,
            tier=tier,
            escalate=escalate,
            sentiment=sentiment,
            complexity=complexity,
            stage="llm",
            latency_ms=elapsed_ms,
            reasons=tuple(esc_reasons + cx_reasons + tier_reasons),
        )


@lru_cache(maxsize=4)
def _loaded(path: str | None) -> RoutingModel:
    """Read a model file once per process: routers share it read-only."""
    return RoutingModel.load(None if path is None else Path(path))


# Models trained at start-up, by config: a process that builds several routers (tests,
# one app per test) trains once. Models are read-only.
_TRAINED: dict[str, RoutingModel] = {}


def model_features(
    masked: str, hits: list[RuleHit], signals: dict[str, str], faq: str | None
) -> list[str]:
    """The words of a text plus what matched it: the model learns how far each rule,
    FAQ entry and signal is to be trusted."""
    feats = features(masked)
    feats.extend("rule:" + h.name for h in hits)
    feats.extend("sig:" + k for k in signals)
    if faq is not None:
        feats.append("faq:" + faq)
    return feats


_SEVERITY = {"positive": 0, "neutral": 1, "negative": 2, "angry": 3}


def _worse(a: str, b: str) -> str:
    return a if _SEVERITY.get(a, 1) >= _SEVERITY.get(b, 1) else b


def describe_hit(h: RuleHit) -> str:
    return f"{h.name} -> {h.intent} (matched '{h.matched}', weight {h.weight:g})"
