"""The trained routing model at run time: three linear heads over one feature space.

`swarmdesk routing train` (orchestration/routing/train.py, scikit-learn) fits logistic
regressions on the features of orchestration/routing/text.py and exports their weights as
plain arrays in an `.npz` file, loaded here with `allow_pickle=False`: no code runs when a
model file is read, and routing needs numpy only (scikit-learn is not imported).

- intent: one logit per intent, softmax with a fitted temperature (calibrated on
  cross-validated predictions), so the probability can be thresholded;
- escalate: does the shopper need a person (anger, threats, asking for one, ...);
- premium: does the answer need the premium tier (reasoning, several facts, care);
- mentions (format 2): one yes/no logit per intent, "does the message ask about this at
  all", so a second task said in passing ("...and is there a coupon?") is found even when
  it has no clause of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestration.routing.text import features

BUILTIN_MODEL = "data/model.npz"
FORMAT = 2
_READABLE = (1, 2)  # format 1: no mentions head


@dataclass(frozen=True, slots=True)
class Scores:
    intents: list[tuple[str, float]]  # every intent with its probability, most likely first
    escalate: float  # probability that a person is needed
    premium: float  # probability that the premium tier is needed
    mentions: dict[str, float]  # intent -> probability that the message asks about it


class ModelFileError(ValueError):
    """A model file that can't be used; the message says why."""


class RoutingModel:
    def __init__(
        self,
        labels: tuple[str, ...],
        vocabulary: list[str],
        weights: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
        meta: dict[str, Any],
    ) -> None:
        k = len(labels)
        width = weights.shape[1] if weights.ndim == 2 else -1
        if (
            width not in (k + 2, 2 * k + 2)
            or weights.shape[0] != len(vocabulary)
            or bias.shape != (width,)
        ):
            raise ModelFileError("weights do not match the vocabulary and labels")
        self.has_mentions = width == 2 * k + 2
        self.labels = labels
        self.index = {f: i for i, f in enumerate(vocabulary)}
        self.weights = weights
        self.bias = bias
        self.meta = meta
        self.temperature = float(meta.get("temperature", 1.0))
        self.escalate_at = float(meta.get("escalate_at", 0.5))
        self.premium_at = float(meta.get("premium_at", 0.5))
        self.examples = int(meta.get("examples", 0))
        at = meta.get("mentions_at") or {}
        self.mentions_at = {lb: float(at.get(lb, 1.0)) for lb in labels}

    @classmethod
    def empty(cls, labels: tuple[str, ...]) -> RoutingModel:
        """A model that knows no feature: a flat distribution, nobody escalated."""
        k = len(labels)
        return cls(labels, [], np.zeros((0, k + 2), np.float32), np.zeros(k + 2, np.float32), {})

    @classmethod
    def load(cls, path: Path | None = None) -> RoutingModel:
        """Read a model file (the one shipped with the package when `path` is None)."""
        try:
            if path is None:
                ref = resources.files("orchestration.routing").joinpath(BUILTIN_MODEL)
                with ref.open("rb") as fh:
                    return cls._from_npz(fh)
            with path.open("rb") as fh:
                return cls._from_npz(fh)
        except FileNotFoundError:
            raise ModelFileError(f"{path or BUILTIN_MODEL}: file not found") from None
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{path or BUILTIN_MODEL}: not a routing model ({e})") from None

    @classmethod
    def _from_npz(cls, fh: Any) -> RoutingModel:
        with np.load(fh, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") not in _READABLE:
                raise ModelFileError(f"model format {meta.get('format')}, expected {FORMAT}")
            return cls(
                tuple(str(x) for x in z["labels"]),
                [str(x) for x in z["vocabulary"]],
                z["weights"].astype(np.float32),
                z["bias"].astype(np.float32),
                meta,
            )

    def save(self, path: Path) -> None:
        vocabulary = sorted(self.index, key=self.index.__getitem__)
        with path.open("wb") as fh:  # a file object: numpy adds no ".npz" to the name
            self._write(fh, vocabulary)

    def _write(self, fh: Any, vocabulary: list[str]) -> None:
        np.savez_compressed(
            fh,
            labels=np.array(self.labels),
            vocabulary=np.array(vocabulary),
            # float16 halves the file; the logits' rounding (~1e-3) changes no decision.
            weights=self.weights.astype(np.float16),
            bias=self.bias,
            meta=np.array(json.dumps(self.meta, ensure_ascii=False)),
        )

    def knows(self, feature: str) -> bool:
        return feature in self.index

    def raw(self, feats: list[str]) -> tuple[npt.NDArray[np.float32], int]:
        """Summed logits of a text's features and how many of them are known."""
        index = self.index
        rows = [i for f in feats if (i := index.get(f)) is not None]
        if not rows:
            return self.bias, 0
        return self.weights[rows].sum(axis=0) + self.bias, len(rows)

    def scores(self, feats: list[str]) -> Scores:
        """Probabilities for a text's features (`text.features()` plus the `rule:`,
        `faq:` and `sig:` names of what matched it, see Router.model_features)."""
        logits, known = self.raw(feats)
        k = len(self.labels)
        if known == 0:
            # Nothing known: a flat distribution rather than a guess.
            flat = 1.0 / k
            intents = [(lb, flat) for lb in self.labels]
        else:
            z = logits[:k].astype(np.float64) / self.temperature
            z = np.exp(z - z.max())
            probs = (z / z.sum()).tolist()
            intents = sorted(zip(self.labels, probs, strict=True), key=_by_p)
        mentions: dict[str, float] = {}
        if self.has_mentions and known:
            mentions = {
                lb: _sigmoid(float(x)) for lb, x in zip(self.labels, logits[k + 2 :], strict=True)
            }
        return Scores(intents, _sigmoid(float(logits[k])), _sigmoid(float(logits[k + 1])), mentions)

    def intents_batch(self, texts: list[list[str]]) -> list[list[tuple[str, float]]]:
        """`scores(...).intents` of several texts' features at once (a message's clauses)."""
        index, k = self.index, len(self.labels)
        rows: list[int] = []
        starts: list[int] = []
        for feats in texts:
            starts.append(len(rows))
            rows.extend(i for f in feats if (i := index.get(f)) is not None)
        counts = np.diff(np.array([*starts, len(rows)]))
        if not rows:
            sums = np.zeros((len(texts), self.weights.shape[1]), np.float32)
        else:
            # reduceat needs in-range starts: an empty text's slot is zeroed after.
            safe = np.minimum(np.array(starts), len(rows) - 1)
            sums = np.add.reduceat(self.weights[rows], safe, axis=0)
            sums[counts == 0] = 0
        z = (sums[:, :k] + self.bias[:k]).astype(np.float64) / self.temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        out = []
        for row, n in zip(probs, counts, strict=True):
            if n == 0:
                out.append([(lb, 1.0 / k) for lb in self.labels])
            else:
                out.append(sorted(zip(self.labels, row.tolist(), strict=True), key=_by_p))
        return out

    def predict(self, norm: str) -> list[tuple[str, float]]:
        """Intent probabilities of a normalised text from its words alone."""
        return self.scores(features(norm)).intents


def _by_p(item: tuple[str, float]) -> float:
    return -item[1]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
