"""Fit the routing model (scikit-learn) and export it as a plain `.npz` (see model.py).

Training data:
- the intents' example utterances of the routing config (intent and mentions heads);
- labeled JSONL files (the project's corpus in orchestration/routing/data/train.jsonl, a
  shop's own files, examples stored from agents' corrections): every head;
- two-task messages made by joining two single-task corpus lines of one language (the
  mentions head learns second intents from them, the escalation head more context), and
  one-task lines led by a pleasantry joined the same way (a thank-you adds no task).

Heads: intent (softmax over the primary intent), escalate, premium (learned from calm
one-task lines only: the router sets the tier of the rest by rule) and mentions (per
intent, "the message also asks about it", learned from lines whose primary is another).

Probabilities are calibrated on out-of-fold predictions: a softmax temperature for the
intent head, and thresholds for the binary heads (escalation and mentions at their best
F1, premium at its best accuracy).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from orchestration.routing.model import FORMAT, RoutingModel

BUILTIN_CORPUS = "data/train.jsonl"
_TASKS = ("logistics", "order_status", "refund", "product", "discount")
_MODEL_TIER = frozenset({*_TASKS, "other"})
_JOIN = {"zh": " 另外", "ja": "。それと、", "vi": ", với lại ", "en": ". also ", "mixed": " 另外 "}
# Escalation's threshold: best F-beta on out-of-fold predictions, recall weighed 1.5 times
# precision: a furious shopper left with the bot costs the shop more than a handover too
# many. Most recall still comes from the rules' signals (anger, threats, asking for a
# person), which escalate in the router on their own.
_ESCALATE_BETA = 1.5
_FOLDS = 5
_MENTION_FOLDS = 3


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    intents: tuple[str, ...]
    tier: str | None = None
    escalate: bool | None = None
    lang: str | None = None


class CorpusError(ValueError):
    """A training file that can't be read; the message names the line."""


def read_examples(path: Path | None = None) -> list[Example]:
    """Labeled JSONL lines (`text`, `intents`, optional `tier`, `escalate`, `lang`); the
    project's corpus when `path` is None."""
    if path is None:
        text = resources.files("orchestration.routing").joinpath(BUILTIN_CORPUS).read_text("utf-8")
        where = BUILTIN_CORPUS
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorpusError(f"{path}: file not found") from None
        where = str(path)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            intents, tier, esc = obj.get("intents") or [], obj.get("tier"), obj.get("escalate")
            if not isinstance(obj.get("text"), str) or not isinstance(intents, list):
                raise ValueError("'text' must be a string and 'intents' a list")
            if tier not in (None, "cheap", "premium"):
                raise ValueError("'tier' must be cheap or premium")
            if esc is not None and not isinstance(esc, bool):
                raise ValueError("'escalate' must be true or false")
            if not intents and tier is None and esc is None:
                raise ValueError("give 'intents', 'tier' or 'escalate' (nothing to learn)")
            out.append(Example(obj["text"], tuple(intents), tier, esc, obj.get("lang")))
        except (ValueError, AttributeError) as e:
            raise CorpusError(f"{where}:{n}: {e}") from None
    return out


def two_task_examples(corpus: Sequence[Example], n: int, seed: int = 11) -> list[Example]:
    """`n` messages asking two things at once, joined from single-task lines."""
    by_lang: dict[str, list[Example]] = {}
    for ex in corpus:
        if len(ex.intents) == 1 and ex.intents[0] in _TASKS and ex.lang in _JOIN:
            by_lang.setdefault(ex.lang or "en", []).append(ex)
    rng = random.Random(seed)
    langs = [lang for lang, rows in by_lang.items() if len(rows) > 1]
    out: list[Example] = []
    for _ in range(n if langs else 0):
        lang = rng.choice(langs)
        a, b = rng.sample(by_lang[lang], 2)
        if a.intents == b.intents:
            continue
        out.append(
            Example(
                a.text + _JOIN[lang] + b.text,
                (a.intents[0], b.intents[0]),
                "premium",
                bool(a.escalate or b.escalate),
                lang,
            )
        )
    return out


def pleasantry_examples(corpus: Sequence[Example], n: int, seed: int = 13) -> list[Example]:
    """`n` one-task messages led by a pleasantry and the same joining word as the two-task
    ones ("thanks! also, where is my parcel"): a thank-you is no second task, so the mentions
    head must not learn that "also" alone means one."""
    kind: dict[str, tuple[list[Example], list[Example]]] = {}
    for ex in corpus:
        if len(ex.intents) == 1 and ex.lang in _JOIN:
            hello, task = kind.setdefault(ex.lang or "en", ([], []))
            if ex.intents[0] == "greeting":
                hello.append(ex)
            elif ex.intents[0] in _TASKS:
                task.append(ex)
    rng = random.Random(seed)
    langs = [lang for lang, (hello, task) in kind.items() if hello and task]
    out: list[Example] = []
    for _ in range(n if langs else 0):
        lang = rng.choice(langs)
        a, b = rng.choice(kind[lang][0]), rng.choice(kind[lang][1])
        out.append(Example(a.text + _JOIN[lang] + b.text, b.intents, b.tier, b.escalate, lang))
    return out


def _tier_by_model(ex: Example) -> bool:
    """Lines whose tier the premium head decides: one task (or "other") asked calmly. The
    router sets the rest by rule (several intents or a complaint: premium; a plain request
    for a person: cheap), so those lines would only teach the head that long or emotional
    text is "premium"."""
    if ex.tier is None:
        return False
    if len(ex.intents) != 1:
        return not ex.intents  # a line labeled with a tier only
    return ex.intents[0] in _MODEL_TIER


def _matrix(texts: Sequence[list[str]], index: dict[str, int]) -> csr_matrix:
    rows, cols = [], []
    for r, feats in enumerate(texts):
        for f in feats:
            c = index.get(f)
            if c is not None:
                rows.append(r)
                cols.append(c)
    data = np.ones(len(rows), dtype=np.float32)
    return csr_matrix((data, (rows, cols)), shape=(len(texts), len(index)))


def _temperature(logits: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> float:
    """The softmax temperature minimising the log loss of held-out logits."""

    def loss(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    return min((0.5 + 0.05 * i for i in range(60)), key=loss)


def _fbeta_threshold(p: npt.NDArray[np.float64], y: npt.NDArray[np.bool_], beta: float) -> float:
    """The threshold with the best F-beta on `p` (beta > 1 weighs recall higher)."""

    def f(t: float) -> float:
        hit = p >= t
        tp = float((hit & y).sum())
        prec = tp / max(1.0, float(hit.sum()))
        rec = tp / max(1.0, float(y.sum()))
        return (1 + beta**2) * prec * rec / max(1e-9, beta**2 * prec + rec)

    return max((0.05 + 0.025 * i for i in range(30)), key=f)


def _accuracy_threshold(p: npt.NDArray[np.float64], y: npt.NDArray[np.bool_]) -> float:
    grid = [0.2 + 0.02 * i for i in range(31)]
    return max(grid, key=lambda t: (float(((p >= t) == y).mean()), -abs(t - 0.5)))


def _coef(m: LogisticRegression) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    return np.asarray(m.coef_).T, np.asarray(m.intercept_)


def _per_class(
    coef: npt.NDArray[np.float64], bias: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """One column of weights per class: scikit-learn keeps a single column for two classes
    (the second's log-odds), which is half of each side's logit."""
    if coef.shape[1] == 1:
        return np.column_stack([-coef[:, 0] / 2, coef[:, 0] / 2]), np.array([-bias[0], bias[0]]) / 2
    return coef, bias


def train(
    intent_examples: Iterable[tuple[str, str]],
    labeled: Sequence[Example],
    *,
    featurize: Callable[[str], list[str]],
    labels: Sequence[str],
    c: float = 2.0,
    combos: int = 400,
    seed: int = 7,
) -> RoutingModel:
    """Fit the four heads. `featurize` turns a message into the features the router
    scores (Router.model_features); `labels` are the intents the router knows."""
    known = set(labels)
    labeled = [ex for ex in labeled if not ex.intents or ex.intents[0] in known]
    # Intent head: config examples and the primary intent of every labeled line.
    config_rows = [(t, lb) for t, lb in intent_examples if lb in known]
    intent_rows = config_rows + [(ex.text, ex.intents[0]) for ex in labeled if ex.intents]
    head_rows = [ex for ex in labeled if ex.tier is not None or ex.escalate is not None]
    written = len(head_rows)  # the joined lines after these only train, never set thresholds
    complete = [ex for ex in head_rows if ex.tier is not None and ex.escalate is not None]
    joined = two_task_examples(complete, combos, seed)
    joined += pleasantry_examples(complete, combos // 4, seed)
    head_rows += joined
    if not intent_rows:
        raise CorpusError("no training examples for the router's intents")

    cache: dict[str, list[str]] = {}

    def feats_of(text: str) -> list[str]:
        got = cache.get(text)
        if got is None:
            got = cache[text] = featurize(text)
        return got

    intent_feats = [feats_of(t) for t, _ in intent_rows]
    head_feats = [feats_of(ex.text) for ex in head_rows]
    vocabulary = sorted({f for fs in (*intent_feats, *head_feats) for f in fs})
    index = {f: i for i, f in enumerate(vocabulary)}
    used = sorted({lb for _, lb in intent_rows})
    label_ix = {lb: i for i, lb in enumerate(used)}
    x = _matrix(intent_feats, index)
    y = np.array([label_ix[lb] for _, lb in intent_rows], dtype=np.int64)

    def fit(xm: csr_matrix, ym: npt.NDArray[np.int64]) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=3000).fit(xm, ym)

    k = len(used)
    temperature = 1.0
    if k > 1:
        intent = fit(x, y)
        coef, bias = _per_class(*_coef(intent))
        smallest = int(np.bincount(y).min())
        if smallest >= 2:
            folds = StratifiedKFold(min(_FOLDS, smallest), shuffle=True, random_state=seed)
            held = np.zeros((len(y), k))
            for tr, te in folds.split(x, y):
                w, b = _per_class(*_coef(fit(x[tr], y[tr])))
                held[te] = x[te] @ w + b
            temperature = _temperature(held, y)
    else:
        coef = np.zeros((len(vocabulary), 1))
        bias = np.zeros(1)

    # Binary heads, each on the lines that label it, with its threshold chosen on
    # out-of-fold probabilities.
    heads: list[tuple[npt.NDArray[np.float64], float, float]] = []
    for pick in ("escalate", "premium"):
        rows = [
            i
            for i, ex in enumerate(head_rows)
            if (ex.escalate is not None if pick == "escalate" else _tier_by_model(ex))
        ]
        target = np.array(
            [bool(head_rows[i].escalate) for i in rows]
            if pick == "escalate"
            else [head_rows[i].tier == "premium" for i in rows]
        )
        if len(rows) < 20 or target.all() or not target.any():
            heads.append((np.zeros(len(vocabulary)), -20.0 if not target.any() else 20.0, 0.5))
            continue
        xh = _matrix([head_feats[i] for i in rows], index)
        model = LogisticRegression(C=c, max_iter=3000).fit(xh, target)
        n_folds = min(_FOLDS, int(target.sum()), int((~target).sum()))
        if n_folds < 2:
            heads.append((model.coef_[0], float(model.intercept_[0]), 0.5))
            continue
        held_p = np.zeros(len(target))
        folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        for tr, te in folds.split(xh, target):
            m = LogisticRegression(C=c, max_iter=3000).fit(xh[tr], target[tr])
            held_p[te] = m.predict_proba(xh[te])[:, 1]
        real = np.array([i < written for i in rows])
        if pick == "escalate":
            at = _fbeta_threshold(held_p[real], target[real], _ESCALATE_BETA)
        else:
            at = _accuracy_threshold(held_p[real], target[real])
        heads.append((model.coef_[0], float(model.intercept_[0]), at))

    mention_rows: list[tuple[str, tuple[str, ...]]] = [(t, (lb,)) for t, lb in config_rows]
    mention_rows += [(ex.text, ex.intents) for ex in labeled if ex.intents]
    real_mentions = len(mention_rows)
    mention_rows += [(ex.text, ex.intents) for ex in joined]
    m_coef, m_bias, mentions_at = _mentions(
        [feats_of(t) for t, _ in mention_rows],
        [lbs for _, lbs in mention_rows],
        real_mentions,
        index,
        used,
        c,
        seed,
    )

    weights = np.column_stack([coef, heads[0][0], heads[1][0], m_coef]).astype(np.float32)
    bias_all = np.concatenate([bias, [heads[0][1], heads[1][1]], m_bias]).astype(np.float32)
    meta = {
        "format": FORMAT,
        "temperature": temperature,
        "escalate_at": heads[0][2],
        "premium_at": heads[1][2],
        "examples": len(intent_rows),
        "labeled": len(head_rows),
        "c": c,
        "mentions_at": mentions_at,
    }
    return RoutingModel(tuple(used), vocabulary, weights, bias_all, meta)


def _mentions(
    feats: Sequence[list[str]],
    sets: Sequence[tuple[str, ...]],
    real: int,
    index: dict[str, int],
    labels: Sequence[str],
    c: float,
    seed: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], dict[str, float]]:
    """One-vs-rest heads "the message also asks about this intent": each learns from the
    lines whose primary intent is another one, so it is asked about second intents, and
    takes the threshold of best F1 on out-of-fold probabilities of the written lines
    (`real` first rows; the joined ones after them only train)."""
    x_all = _matrix(feats, index)
    coef = np.zeros((len(index), len(labels)))
    bias = np.full(len(labels), -20.0)
    at: dict[str, float] = {}
    for j, lb in enumerate(labels):
        rows = np.array([i for i, s in enumerate(sets) if s[0] != lb], dtype=np.int64)
        x = x_all[rows]
        y = np.array([lb in sets[i] for i in rows])
        n_real = int((rows < real).sum())
        if y.sum() < _FOLDS or (~y).sum() < _FOLDS:
            at[lb] = 1.0  # too few lines to learn from: never fires
            continue
        # Balanced: a second intent is rare for each intent, and unweighted probabilities
        # would all sit near 0.
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x, y)
        coef[:, j], bias[j] = model.coef_[0], float(model.intercept_[0])
        held = np.zeros(len(y))
        folds = StratifiedKFold(_MENTION_FOLDS, shuffle=True, random_state=seed)
        for tr, te in folds.split(x, y):
            m = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
            held[te] = m.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
        at[lb] = _fbeta_threshold(held[:n_real], y[:n_real], 1.0)
    return coef, bias, at
