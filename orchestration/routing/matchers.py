"""Compiled forms of the configured keywords and regular expressions.

All keywords of all rules, FAQ entries and signals live in one Aho-Corasick automaton
(pyahocorasick), so a message is scanned once for every keyword at C speed, instead of
once per keyword; a regex alternation of hundreds of words is several times slower.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import ahocorasick  # type: ignore[import-not-found]  # ships no type hints

from orchestration.routing.config import FaqSpec, Matcher, RuleSpec, SignalsSpec
from orchestration.routing.text import normalize_pattern

_NON_WORD = re.compile(r"[^a-z0-9]+")

Found = Mapping[int, str]
"""Matcher id -> the first of its keywords found in a text."""


def latin_words(norm: str) -> str:
    """The message's Latin words and digits, space-separated and space-padded."""
    return " " + _NON_WORD.sub(" ", norm).strip() + " "


class KeywordIndex:
    """Every keyword of every matcher; `scan` finds them all in one pass.

    An ASCII keyword matches whole words only, punctuation ignored ("hi" does not match
    "shipping"; "usb-c" matches "USB C"); any other keyword (CJK, kana) matches anywhere.
    """

    def __init__(self) -> None:
        self._plain: dict[str, list[tuple[int, str]]] = {}
        self._words: dict[str, list[tuple[int, str]]] = {}
        self._next = 0
        self._auto_plain: ahocorasick.Automaton | None = None
        self._auto_words: ahocorasick.Automaton | None = None

    def register(self, keywords: list[str]) -> int:
        owner = self._next
        self._next += 1
        for k in keywords:
            n = normalize_pattern(k.strip())
            latin = _NON_WORD.sub(" ", n).strip()
            if n.isascii() and latin:
                self._words.setdefault(f" {latin} ", []).append((owner, latin))
            else:
                self._plain.setdefault(n, []).append((owner, n))
        return owner

    def build(self) -> None:
        self._auto_plain = _automaton(self._plain)
        self._auto_words = _automaton(self._words)

    def scan(self, norm: str, words: str | None = None) -> dict[int, str]:
        found: dict[int, str] = {}
        if self._auto_plain is not None:
            for _end, owners in self._auto_plain.iter(norm):
                for owner, kw in owners:
                    found.setdefault(owner, kw)
        if self._auto_words is not None:
            w = latin_words(norm) if words is None else words
            for _end, owners in self._auto_words.iter(w):
                for owner, kw in owners:
                    found.setdefault(owner, kw)
        return found


def _automaton(table: dict[str, list[tuple[int, str]]]) -> ahocorasick.Automaton | None:
    if not table:
        return None
    auto = ahocorasick.Automaton()
    for key, owners in table.items():
        auto.add_word(key, owners)
    auto.make_automaton()
    return auto


class CompiledMatcher:
    """One matcher: its keywords (in the shared index) and its patterns (one regex)."""

    def __init__(self, matcher: Matcher, index: KeywordIndex | None = None) -> None:
        self.id = (index or KeywordIndex()).register(matcher.keywords)
        self._keywords = [normalize_pattern(k.strip()) for k in matcher.keywords]
        parts = [f"(?:{normalize_pattern(p)})" for p in matcher.patterns]
        self._re = re.compile("|".join(parts)) if parts else None

    def find(self, norm: str, found: Found) -> str | None:
        """The first matching text, or None; `found` is the index's scan of `norm`."""
        hit = found.get(self.id)
        if hit is not None:
            return hit
        if self._re is not None:
            m = self._re.search(norm)
            if m:
                return m.group(0)
        return None

    def sub(self, norm: str) -> str:
        """`norm` with every match cut out (used to drop denied topics)."""
        out = self._re.sub(" ", norm) if self._re is not None else norm
        for k in self._keywords:
            out = out.replace(k, " ")
        return out


@dataclass(frozen=True, slots=True)
class RuleHit:
    name: str
    intent: str
    matched: str
    weight: float


class CompiledRule:
    def __init__(self, spec: RuleSpec, index: KeywordIndex) -> None:
        self.name = spec.name
        self.intent = spec.intent
        self.weight = spec.weight
        self._matcher = CompiledMatcher(spec, index)

    def match(self, norm: str, found: Found) -> RuleHit | None:
        hit = self._matcher.find(norm, found)
        if hit is None:
            return None
        return RuleHit(self.name, self.intent, hit, self.weight)


class CompiledFaq:
    def __init__(self, spec: FaqSpec, index: KeywordIndex) -> None:
        self.name = spec.name
        self.intent = spec.intent
        self.answers = spec.answers
        self._matcher = CompiledMatcher(spec, index)

    def match(self, norm: str, found: Found) -> str | None:
        return self._matcher.find(norm, found)

    def answer(self, lang: str) -> str:
        if lang in self.answers:
            return self.answers[lang]
        if "en" in self.answers:
            return self.answers["en"]
        return next(iter(self.answers.values()))


class CompiledSignals:
    def __init__(self, spec: SignalsSpec, index: KeywordIndex) -> None:
        self.by_name = {
            name: CompiledMatcher(getattr(spec, name), index)
            for name in SignalsSpec.model_fields
            if name != "negation"
        }
        # Denied topics are cut out before anything else is scanned: not in the index.
        self.negation = CompiledMatcher(spec.negation, KeywordIndex())

    def found(self, norm: str, found: Found) -> dict[str, str]:
        """Signal name -> the text that matched, for every signal present."""
        out = {}
        for name, m in self.by_name.items():
            hit = m.find(norm, found)
            if hit is not None:
                out[name] = hit
        return out
