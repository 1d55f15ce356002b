"""The `routing:` section of swarmdesk.yaml.

The built-in data (orchestration/routing/default_routing.yaml: intents with example
utterances, rules, FAQ answers, signal words) is always the base unless `builtin: false`.
What a shop writes is added to it: examples are appended to an intent's examples (or
define a new intent), a rule or FAQ entry with the name of a built-in one replaces it
(`enabled: false` switches it off), signal words are added to the built-in lists.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection
from orchestration.routing.text import normalize_pattern

BUILTIN_LABELS = (
    "logistics",
    "order_status",
    "refund",
    "product",
    "discount",
    "human",
    "complaint",
    "greeting",
    "other",
)
BUILTIN_FILE = "default_routing.yaml"


class Matcher(ConfigSection):
    """Words and regular expressions, matched against the normalised message: lower case,
    traditional Chinese as simplified, full-width as half-width, Latin without diacritics.
    A Latin keyword matches whole words only ("hi" does not match "shipping")."""

    keywords: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list, description="Python regular expressions")

    @field_validator("keywords")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        for i, k in enumerate(v):
            if not k.strip():
                raise ValueError(f"keyword [{i}] is empty; remove it")
        return v

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(normalize_pattern(p))
            except re.error as e:
                raise ValueError(
                    f"pattern [{i}] '{p}' is not a valid regular expression: {e}; "
                    r"escape literal characters like ( ) [ ] ? + * with a backslash"
                ) from None
        return v

    def empty(self) -> bool:
        return not self.keywords and not self.patterns


class IntentSpec(ConfigSection):
    description: str = Field("", description="one line, shown to the LLM classifier")
    examples: list[str] = Field(
        default_factory=list, description="example shopper messages the classifier learns from"
    )


class RuleSpec(Matcher):
    """A keyword/regex route: when it matches, `intent` is one of the message's intents."""

    name: str = Field(min_length=1)
    intent: str
    weight: float = Field(
        0.6, gt=0, le=5, description="added to the classifier's probability of the intent"
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _has_matcher(self) -> RuleSpec:
        if self.enabled and self.empty():
            raise ValueError(f"rule '{self.name}' needs keywords or patterns")
        return self


class FaqSpec(Matcher):
    """A question answered directly, with no model call."""

    name: str = Field(min_length=1)
    intent: str = "other"
    answers: dict[str, str] = Field(
        default_factory=dict,
        description="language (zh, en, ja, vi, ...) -> answer; 'en' is the fallback",
    )
    questions: list[str] = Field(
        default_factory=list,
        description="example questions this entry answers (documentation and self-test)",
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _complete(self) -> FaqSpec:
        if self.enabled:
            if self.empty():
                raise ValueError(f"faq '{self.name}' needs keywords or patterns")
            if not self.answers:
                raise ValueError(f"faq '{self.name}' needs answers (e.g. answers: {{en: ...}})")
        return self


class SignalsSpec(ConfigSection):
    """Cues for sentiment, escalation and tier; each list adds to the built-in one."""

    negation: Matcher = Field(
        default_factory=Matcher,
        description="phrases that deny a topic ('not a complaint', '不要人工'): removed first",
    )
    anger: Matcher = Field(default_factory=Matcher)
    abuse: Matcher = Field(default_factory=Matcher)
    threat: Matcher = Field(default_factory=Matcher, description="legal, regulators, public")
    safety: Matcher = Field(default_factory=Matcher)
    account_takeover: Matcher = Field(default_factory=Matcher)
    repeated_failure: Matcher = Field(default_factory=Matcher)
    negative: Matcher = Field(default_factory=Matcher)
    sarcasm: Matcher = Field(default_factory=Matcher)
    positive: Matcher = Field(default_factory=Matcher)
    defect: Matcher = Field(default_factory=Matcher, description="defect claims -> premium")
    dispute: Matcher = Field(default_factory=Matcher, description="disputes -> premium")
    calculation: Matcher = Field(default_factory=Matcher, description="price sums -> premium")
    advice: Matcher = Field(default_factory=Matcher, description="comparisons -> premium")
    several: Matcher = Field(
        default_factory=Matcher, description="several orders or parcels at once -> premium"
    )


class RoutingData(ConfigSection):
    """What the router is built from (the built-in file has this shape)."""

    intents: dict[str, IntentSpec] = Field(default_factory=dict)
    rules: list[RuleSpec] = Field(default_factory=list)
    faq: list[FaqSpec] = Field(default_factory=list)
    signals: SignalsSpec = Field(default_factory=SignalsSpec)


class RoutingSettings(RoutingData):
    """`routing:` in swarmdesk.yaml. Everything is optional: the built-in data routes alone."""

    builtin: bool = Field(True, description="start from the built-in intents, rules and FAQ")
    llm_below: float = Field(
        0.6, ge=0, le=1, description="ask the LLM when the local confidence is below this"
    )
    secondary_min: float = Field(
        0.8, ge=0, le=1, description="probability for a clause to add its intent"
    )
    secondary_rule_min: float = Field(
        0.5, ge=0, le=1, description="the same for a clause that a rule of the intent matched"
    )
    secondary_fused_min: float = Field(
        0.2, ge=0, le=1, description="whole-message probability of a ruled second intent"
    )
    long_message: int = Field(
        140, gt=0, description="messages longer than this (CJK characters count 2) go premium"
    )
    llm_max_tokens: int = Field(120, gt=0)
    llm_timeout_seconds: float = Field(6.0, gt=0)
    model: str | None = Field(
        None,
        description="a model file from `swarmdesk routing train` (default: the shipped one)",
    )

    @model_validator(mode="after")
    def _check(self) -> RoutingSettings:
        labels = set(self.intents)
        if self.builtin:
            labels |= set(builtin_data().intents)
        problems = []
        sections: tuple[tuple[str, Sequence[RuleSpec | FaqSpec]], ...] = (
            ("rules", self.rules),
            ("faq", self.faq),
        )
        for kind, entries in sections:
            names: set[str] = set()
            for i, entry in enumerate(entries):
                if entry.name in names:
                    problems.append(f"{kind}[{i}].name: '{entry.name}' is used twice")
                names.add(entry.name)
                if entry.intent not in labels:
                    close = difflib.get_close_matches(entry.intent, sorted(labels), n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    problems.append(
                        f"{kind}[{i}].intent: unknown intent '{entry.intent}' in '{entry.name}'"
                        f" - {hint}known: {', '.join(sorted(labels))} (or add it under intents:)"
                    )
        if self.model is not None and not Path(self.model).is_file():
            problems.append(
                f"model: no file at '{self.model}' (write one with `swarmdesk routing train`)"
            )
        if not self.builtin and not any(spec.examples for spec in self.intents.values()):
            problems.append("intents: with builtin: false, give example utterances for intents")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved(self) -> RoutingData:
        """The built-in data with this section's additions and replacements applied."""
        if not self.builtin:
            return RoutingData(
                intents=self.intents, rules=self.rules, faq=self.faq, signals=self.signals
            )
        return merge(builtin_data(), self)


def merge(base: RoutingData, extra: RoutingData) -> RoutingData:
    intents = {name: spec.model_copy(deep=True) for name, spec in base.intents.items()}
    for name, spec in extra.intents.items():
        if name in intents:
            old = intents[name]
            intents[name] = IntentSpec(
                description=spec.description or old.description,
                examples=[*old.examples, *spec.examples],
            )
        else:
            intents[name] = spec
    rules = {r.name: r for r in base.rules} | {r.name: r for r in extra.rules}
    faq = {f.name: f for f in base.faq} | {f.name: f for f in extra.faq}
    signals: dict[str, Any] = {}
    for key in SignalsSpec.model_fields:
        a: Matcher = getattr(base.signals, key)
        b: Matcher = getattr(extra.signals, key)
        signals[key] = Matcher(
            keywords=[*a.keywords, *b.keywords], patterns=[*a.patterns, *b.patterns]
        )
    return RoutingData(
        intents=intents,
        rules=[r for r in rules.values() if r.enabled],
        faq=[f for f in faq.values() if f.enabled],
        signals=SignalsSpec(**signals),
    )


@lru_cache(maxsize=1)
def builtin_data() -> RoutingData:
    text = resources.files("orchestration.routing").joinpath(BUILTIN_FILE).read_text("utf-8")
    return RoutingData.model_validate(yaml.safe_load(text))
