"""The local intent classifier: naive Bayes over character n-grams, calibrated.

Trained at start-up from the example utterances of the routing config (a few hundred
short texts: counting takes milliseconds). Multinomial naive Bayes on binary features is
a good fit for short texts, but its raw posteriors are overconfident and grow with the
message length, so the scores are rescaled as `a * score / n**b` (n = known features in
the message) before the softmax, with `a` and `b` fitted by cross-validation on the
examples to minimise the log loss: the result is a probability one can threshold on.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestration.routing.text import features

_FOLDS = 5
_B_GRID = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, slots=True)
class Scored:
    """Raw naive-Bayes evidence for one text."""

    scores: tuple[float, ...]  # per label, log-likelihood without the constant
    known: int  # how many of the text's features the model has seen


def _count(k: int, docs: Sequence[tuple[int, list[str]]]) -> tuple[dict[str, list[int]], list[int]]:
    """Feature -> documents per label containing it; feature occurrences per label."""
    counts: dict[str, list[int]] = {}
    totals = [0] * k
    for label, feats in docs:
        totals[label] += len(feats)
        for f in feats:
            row = counts.get(f)
            if row is None:
                row = counts[f] = [0] * k
            row[label] += 1
    return counts, totals


class _Counts:
    """Multinomial naive Bayes with binary features and a uniform prior.

    `only`: build the scoring table for these features alone (cross-validation folds only
    score their held-out texts; the full table is what start-up time is spent on).
    """

    def __init__(
        self,
        counts: dict[str, list[int]],
        totals: list[int],
        alpha: float,
        only: set[str] | None = None,
    ) -> None:
        k = len(totals)
        v = len(counts)
        top = max((max(r) for r in counts.values()), default=0)
        # log((count + alpha) / (total + alpha * v)), from a small table of log(count + alpha).
        log_count = [math.log(c + alpha) for c in range(top + 1)]
        log_total = [math.log(t + alpha * v) for t in totals]
        wanted = counts.keys() if only is None else counts.keys() & only
        # Each feature holds its log-probability under every label: scoring a text is
        # then one vector addition per feature.
        self.table: dict[str, tuple[float, ...]] = {
            f: tuple(map(operator.sub, map(log_count.__getitem__, counts[f]), log_total))
            for f in wanted
        }
        self.k = k

    def score(self, feats: Sequence[str]) -> Scored:
        table = self.table
        rows = [row for f in feats if (row := table.get(f)) is not None]
        if not rows:
            return Scored((0.0,) * self.k, 0)
        # zip(*rows) transposes in C: one sum per label instead of a Python loop per feature.
        return Scored(tuple(map(sum, zip(*rows, strict=True))), len(rows))


def _softmax(scores: Sequence[float], scale: float) -> list[float]:
    top = max(scores)
    exps = [math.exp((s - top) * scale) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def _scale(a: float, b: float, known: int) -> float:
    return a / math.pow(max(known, 1), b)


class IntentClassifier:
    def __init__(
        self, examples: Mapping[str, Sequence[str]], *, alpha: float = 0.3, seed: int = 7
    ) -> None:
        """`examples`: label -> normalised example texts (at least one label with examples)."""
        self.labels: tuple[str, ...] = tuple(sorted(lb for lb, ex in examples.items() if ex))
        if not self.labels:
            raise ValueError("the classifier needs example utterances for at least one intent")
        index = {lb: i for i, lb in enumerate(self.labels)}
        docs = [(index[lb], features(t)) for lb, ex in examples.items() if ex for t in ex]
        counts, totals = _count(len(self.labels), docs)
        self._model = _Counts(counts, totals, alpha)
        self.a, self.b = self._calibrate(docs, counts, totals, alpha, seed)
        self.examples = len(docs)

    def _calibrate(
        self,
        docs: list[tuple[int, list[str]]],
        counts: dict[str, list[int]],
        totals: list[int],
        alpha: float,
        seed: int,
    ) -> tuple[float, float]:
        """Fit the score scale on held-out predictions (k-fold cross-validation)."""
        if len(docs) < _FOLDS * 2 or len(self.labels) < 2:
            return 1.0, 0.0
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        held: list[tuple[int, Scored]] = []
        for fold in range(_FOLDS):
            test = order[fold::_FOLDS]
            # The fold's counts: everything minus its held-out texts (no recounting).
            minus, minus_totals = _count(len(self.labels), [docs[i] for i in test])
            fold_counts = dict(counts)
            for f, row in minus.items():
                left = [a - b for a, b in zip(counts[f], row, strict=True)]
                if any(left):
                    fold_counts[f] = left
                else:
                    del fold_counts[f]  # seen only in held-out texts: unknown to the fold
            fold_totals = [a - b for a, b in zip(totals, minus_totals, strict=True)]
            model = _Counts(fold_counts, fold_totals, alpha, set(minus))
            held.extend((docs[i][0], model.score(docs[i][1])) for i in test)

        def loss(a: float, b: float) -> float:
            total = 0.0
            for label, s in held:
                p = _softmax(s.scores, _scale(a, b, s.known))[label]
                total -= math.log(max(p, 1e-12))
            return total / len(held)

        best = (math.inf, 1.0, 0.0)
        for b in _B_GRID:
            # The loss is unimodal in log(a): golden-section search over a in [1e-3, 1e2].
            lo, hi = math.log(1e-3), math.log(1e2)
            g = (math.sqrt(5) - 1) / 2
            x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
            f1, f2 = loss(math.exp(x1), b), loss(math.exp(x2), b)
            for _ in range(8):
                if f1 < f2:
                    hi, x2, f2 = x2, x1, f1
                    x1 = hi - g * (hi - lo)
                    f1 = loss(math.exp(x1), b)
                else:
                    lo, x1, f1 = x1, x2, f2
                    x2 = lo + g * (hi - lo)
                    f2 = loss(math.exp(x2), b)
            a, at_a = (math.exp(x1), f1) if f1 < f2 else (math.exp(x2), f2)
            if at_a < best[0]:
                best = (at_a, a, b)
        return best[1], best[2]

    def predict(self, norm: str) -> list[tuple[str, float]]:
        """(label, probability) for every label, most likely first."""
        s = self._model.score(features(norm))
        if s.known == 0:
            # Nothing known: say so with a flat distribution rather than guess.
            p = 1.0 / len(self.labels)
            return [(lb, p) for lb in self.labels]
        probs = _softmax(s.scores, _scale(self.a, self.b, s.known))
        return sorted(zip(self.labels, probs, strict=True), key=lambda x: -x[1])
