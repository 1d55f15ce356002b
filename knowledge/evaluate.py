"""How well the knowledge base answers a question set (`swarmdesk eval-knowledge`).

A question file is JSONL, one object a line:
    {"id": "ret-en-01", "lang": "en", "question": "...", "sources": ["returns"],
     "facts": ["7 days", ["30 days", "thirty days"]]}
`sources` are document slugs (a file's name before its first dot: returns.zh.md -> returns),
so any language variant of a document counts; `facts` are short strings a correct answer
contains (a list inside the list: alternatives). `"sources": []` marks a question the
documents do not answer: the right retrieval result is no passage at all.

Figures: retrieval hit@1 / hit@3 per language group, how often nothing was found (right for
the unanswerable questions, wrong for the others), latency of the real search and of a search
over an index scaled to N chunks, and — when an answering function is given (the CLI builds
one with the orchestrator and the model simulator) — the share of answers carrying every fact
and a citation.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowledge import tokenize
from knowledge.base import DEFAULT_COLLECTION, Passage
from knowledge.config import KnowledgeSettings
from knowledge.embeddings import Provider
from knowledge.errors import KnowledgeError
from knowledge.index import CollectionIndex
from knowledge.service import KnowledgeBase
from knowledge.sources import KINDS, read_document
from storage.executor import Database
from storage.knowledge import StoredChunk

LANGS = ("zh", "en", "ja", "vi", "mixed")
# The demo shop's documents and the project's question set, next to the demo shop's data.
DEMO_DIR = Path(__file__).resolve().parent.parent / "bot" / "demo_shop"
DEMO_DOCS = DEMO_DIR / "knowledge"
DEMO_QUESTIONS = DEMO_DIR / "knowledge_questions.jsonl"
# Targets of issue #17.
HIT3_TARGET = 0.90
P99_TARGET_MS = 20.0

Fact = str | list[str]


class QuestionFileError(ValueError):
    """A question file that can't be used; the message names the line and the fix."""


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    lang: str
    question: str
    sources: list[str]
    facts: list[Fact]

    @property
    def answerable(self) -> bool:
        return bool(self.sources)

    @property
    def doc_lang(self) -> str:
        """The language of the documents its facts are written in."""
        return "zh" if self.lang == "mixed" else self.lang


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a question file (every problem at once, with line numbers)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QuestionFileError(f"{p}: no such file; give the path of a JSONL file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuestionFileError(f"{p}: can't read it as UTF-8 text ({e})") from None
    questions: list[Question] = []
    problems: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            q = _question(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        except ValueError as e:
            problems.append(f"line {n}: {e}")
            continue
        if q.id in seen:
            problems.append(f"line {n}: id '{q.id}' is used twice; give each question its own")
            continue
        seen.add(q.id)
        questions.append(q)
    if not questions and not problems:
        problems.append("no questions in it; write one JSON object a line")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise QuestionFileError(f"{p}:\n  {shown}{more}")
    return questions


def _question(obj: Any) -> Question:
    if not isinstance(obj, dict):
        raise ValueError('write an object: {"id": ..., "lang": ..., "question": ..., ...}')
    missing = [k for k in ("id", "lang", "question", "sources", "facts") if k not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    qid, lang, text = obj["id"], obj["lang"], obj["question"]
    if not isinstance(qid, str) or not qid.strip():
        raise ValueError("id must be a non-empty string")
    if lang not in LANGS:
        raise ValueError(f"lang '{lang}' is not one of {', '.join(LANGS)}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("question must be a non-empty string")
    sources, facts = obj["sources"], obj["facts"]
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise ValueError('sources must be a list of document slugs, e.g. ["returns"], or []')
    if not isinstance(facts, list) or not all(_is_fact(f) for f in facts):
        raise ValueError('facts must be a list of strings (or lists of alternatives): ["7 days"]')
    if not sources and facts:
        raise ValueError("a question with no sources (unanswerable) must have no facts")
    if sources and not facts:
        raise ValueError("an answerable question needs at least one fact its answer contains")
    return Question(qid, lang, text, [s.lower() for s in sources], facts)


def _is_fact(f: Any) -> bool:
    if isinstance(f, str):
        return bool(f.strip())
    return isinstance(f, list) and bool(f) and all(isinstance(a, str) and a.strip() for a in f)


# --- matching ------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case and whitespace don't matter when looking for a fact ("7 天" is "7天")."""
    return _SPACE.sub("", text).casefold()


def has_fact(text: str, fact: Fact) -> bool:
    t = normalise(text)
    options = [fact] if isinstance(fact, str) else fact
    return any(normalise(o) in t for o in options)


def slug_of(source: str) -> str:
    """returns.zh.md -> returns; /path/to/product-el-1001.en.html -> product-el-1001."""
    name = re.split(r"[\\/]", source.rstrip("/\\"))[-1]
    return name.split(".", 1)[0].lower()


def lang_of(source: str) -> str | None:
    """returns.zh.md -> zh (None when the name has no language part)."""
    parts = re.split(r"[\\/]", source)[-1].split(".")
    return parts[1].lower() if len(parts) >= 3 else None


def document_texts(folder: Path) -> dict[tuple[str, str | None], str]:
    """(slug, language) -> the parsed text of every document in `folder` (what is indexed)."""
    out: dict[tuple[str, str | None], str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in KINDS or path.name.startswith("."):
            continue
        doc = read_document(path)
        parts = [doc.title]
        for s in doc.sections:
            parts.append(s.heading)
            parts.extend(s.paragraphs)
        out[(slug_of(path.name), lang_of(path.name))] = "\n".join(parts)
    return out


def fact_problems(questions: Sequence[Question], folder: Path) -> list[str]:
    """Each fact must occur in one of its question's source documents, in the question's
    language (mixed: Chinese), else in another language variant when that language has
    none (product pages exist in en/zh only)."""
    texts = document_texts(folder)
    slugs = {s for s, _ in texts}
    problems: list[str] = []
    for q in questions:
        for src in q.sources:
            if src not in slugs:
                problems.append(f"{q.id}: no document '{src}' in {folder}")
        docs = [t for (s, lang), t in texts.items() if s in q.sources and lang == q.doc_lang]
        if not docs:
            docs = [t for (s, _), t in texts.items() if s in q.sources]
        for fact in q.facts:
            if not any(has_fact(d, fact) for d in docs):
                problems.append(f"{q.id}: fact {fact!r} is not in {q.sources} ({q.doc_lang})")
    return problems


# --- retrieval -----------------------------------------------------------------------------

Search = Callable[[str], Awaitable[list[Passage]]]


@dataclass(slots=True)
class Outcome:
    question: Question
    found: list[str]  # slugs of the passages found, best first
    ms: float
    answer: str | None = None
    # Answerable: every fact, and a citation (or the FAQ fast path); unanswerable: no citation.
    answer_ok: bool | None = None
    fast_path: bool = False

    @property
    def rank(self) -> int | None:
        """1-based rank of the first passage from an expected document."""
        for i, slug in enumerate(self.found, start=1):
            if slug in self.question.sources:
                return i
        return None


async def run_retrieval(questions: Sequence[Question], search: Search) -> list[Outcome]:
    out: list[Outcome] = []
    for q in questions:
        t0 = time.perf_counter()
        passages = await search(q.question)
        ms = (time.perf_counter() - t0) * 1000
        out.append(Outcome(q, [slug_of(p.source) for p in passages], ms))
    return out


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


# --- an index scaled to N chunks ------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def perturbed(chunk: StoredChunk, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """The chunk's text with its numbers changed, a sentence or two dropped and some words
    from the rest of the collection mixed in: near the real documents' vocabulary and term
    statistics, never an exact copy."""
    sentences = [s for s in re.split(r"(?<=[.!?。！？])\s*", chunk.text) if s.strip()]
    if len(sentences) > 2:
        for _ in range(rng.randint(1, 2)):
            sentences.pop(rng.randrange(len(sentences)))
    text = " ".join(sentences)
    text = _NUMBER.sub(lambda m: str(rng.randint(1, 9) * 10 ** (len(m.group()) - 1)), text)
    extra = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 12)))
    return f"{text} {extra}"


def scaled_chunks(chunks: Sequence[StoredChunk], total: int, seed: int = 17) -> list[StoredChunk]:
    """`chunks` followed by perturbed copies of them, `total` in all."""
    if not chunks:
        raise KnowledgeError("no chunks to scale: the collection is empty")
    rng = random.Random(seed)
    vocabulary = sorted({w for c in chunks for w in c.text.split() if len(w) > 1})
    out = list(chunks)
    next_id = max(c.id for c in chunks) + 1
    while len(out) < total:
        base = chunks[(len(out) - len(chunks)) % len(chunks)]
        text = perturbed(base, rng, vocabulary)
        terms = " ".join(tokenize.terms(f"{base.title}\n{base.heading}\n{text}"))
        out.append(
            StoredChunk(
                id=next_id,
                document_id=base.document_id + 1_000_000,  # not a real document's id
                collection=base.collection,
                source=f"synthetic/{slug_of(base.source)}-copy.{next_id}",
                title=base.title,
                heading=base.heading,
                text=text,
                url=None,
                version=1,
                terms=terms,
                embedding=None,
            )
        )
        next_id += 1
    return out[:total]


def time_searches(
    search: Callable[[str], list[Passage]], queries: Iterable[str], rounds: int = 3
) -> list[float]:
    """Milliseconds per search, each query `rounds` times (in the caller's thread)."""
    qs = list(queries)
    for q in qs[:5]:  # warm caches (tokenizer dictionaries) before timing
        search(q)
    ms: list[float] = []
    for _ in range(rounds):
        for q in qs:
            t0 = time.perf_counter()
            search(q)
            ms.append((time.perf_counter() - t0) * 1000)
    return ms


def lexical_search(
    index: CollectionIndex, min_relevance: float, k: int = 3
) -> Callable[[str], list[Passage]]:
    def search(query: str) -> list[Passage]:
        return index.search(tokenize.terms(query), k=k, min_relevance=min_relevance)

    return search


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    answerable: int
    hit1: float
    hit3: float
    empty_wrongly: float  # answerable questions that got no passage
    unanswerable: int
    empty_rightly: float  # unanswerable questions that got no passage
    answers: int  # answerable questions that were answered (0: answers not run)
    answer_coverage: float  # of those: every fact and a citation
    declined: float  # unanswerable questions answered without citing a policy


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome]
    chunks: int  # in the evaluated collection
    p50_ms: float
    p99_ms: float
    scaled_chunks: int = 0
    scaled_p50_ms: float = 0.0
    scaled_p99_ms: float = 0.0
    groups: list[Group] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.groups:
            names = [g for g in LANGS if any(o.question.lang == g for o in self.outcomes)]
            self.groups = [
                _group(n, [o for o in self.outcomes if o.question.lang == n]) for n in names
            ]
            self.groups.append(_group("all", self.outcomes))

    @property
    def overall(self) -> Group:
        return self.groups[-1]

    @property
    def hit3_met(self) -> bool:
        return self.overall.hit3 >= HIT3_TARGET

    @property
    def latency_met(self) -> bool | None:
        return self.scaled_p99_ms <= P99_TARGET_MS if self.scaled_chunks else None

    def misses(self) -> list[Outcome]:
        """Answerable questions with no expected document in the top 3, and unanswerable
        ones that got passages."""
        return [
            o
            for o in self.outcomes
            if (o.question.answerable and (o.rank is None or o.rank > 3))
            or (not o.question.answerable and o.found)
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "questions": len(self.outcomes),
            "chunks": self.chunks,
            "groups": {
                g.name: {
                    "answerable": g.answerable,
                    "hit@1": round(g.hit1, 4),
                    "hit@3": round(g.hit3, 4),
                    "answerable_with_no_passage": round(g.empty_wrongly, 4),
                    "unanswerable": g.unanswerable,
                    "unanswerable_with_no_passage": round(g.empty_rightly, 4),
                    "answered": g.answers,
                    "answer_fact_coverage": round(g.answer_coverage, 4),
                    "unanswerable_declined": round(g.declined, 4),
                }
                for g in self.groups
            },
            "latency_ms": {"p50": round(self.p50_ms, 3), "p99": round(self.p99_ms, 3)},
            "scaled": {
                "chunks": self.scaled_chunks,
                "p50_ms": round(self.scaled_p50_ms, 3),
                "p99_ms": round(self.scaled_p99_ms, 3),
            },
            "targets": {
                "hit@3": {"target": HIT3_TARGET, "met": self.hit3_met},
                "p99_ms": {
                    "target": P99_TARGET_MS,
                    "chunks": self.scaled_chunks,
                    "met": self.latency_met,
                },
            },
            "misses": [
                {
                    "id": o.question.id,
                    "question": o.question.question,
                    "expected": o.question.sources,
                    "found": o.found,
                }
                for o in self.misses()
            ],
            "answers": [
                {
                    "id": o.question.id,
                    "ok": o.answer_ok,
                    "fast_path": o.fast_path,
                    "answer": o.answer,
                }
                for o in self.outcomes
                if o.answer is not None
            ],
        }


def _share(n: int, d: int) -> float:
    return n / d if d else 0.0


def _group(name: str, outcomes: Sequence[Outcome]) -> Group:
    ans = [o for o in outcomes if o.question.answerable]
    una = [o for o in outcomes if not o.question.answerable]
    answered = [o for o in ans if o.answer_ok is not None]
    una_answered = [o for o in una if o.answer_ok is not None]
    return Group(
        name=name,
        answerable=len(ans),
        hit1=_share(sum(1 for o in ans if o.rank == 1), len(ans)),
        hit3=_share(sum(1 for o in ans if o.rank is not None and o.rank <= 3), len(ans)),
        empty_wrongly=_share(sum(1 for o in ans if not o.found), len(ans)),
        unanswerable=len(una),
        empty_rightly=_share(sum(1 for o in una if not o.found), len(una)),
        answers=len(answered),
        answer_coverage=_share(sum(1 for o in answered if o.answer_ok), len(answered)),
        declined=_share(sum(1 for o in una_answered if o.answer_ok), len(una_answered)),
    )


def _pct(x: float) -> str:
    return f"{x * 100:5.1f}%"


def format_report(report: Report, *, show_misses: int = 0) -> str:
    lines = [
        f"{len(report.outcomes)} questions over {report.chunks} chunks",
        "",
        f"{'group':<7} {'n':>4} {'hit@1':>7} {'hit@3':>7} {'none!':>7} "
        f"{'unans':>5} {'none ok':>7} {'answers':>7} {'facts+cite':>10} {'declined':>8}",
    ]
    for g in report.groups:
        cover = _pct(g.answer_coverage) if g.answers else "     -"
        declined = _pct(g.declined) if g.answers and g.unanswerable else "     -"
        lines.append(
            f"{g.name:<7} {g.answerable:>4} {_pct(g.hit1):>7} {_pct(g.hit3):>7} "
            f"{_pct(g.empty_wrongly):>7} {g.unanswerable:>5} "
            f"{_pct(g.empty_rightly) if g.unanswerable else '     -':>7} "
            f"{g.answers:>7} {cover:>10} {declined:>8}"
        )
    lines += [
        "",
        "none! = answerable but nothing found; none ok = unanswerable and nothing found;",
        "facts+cite = answers with every fact and a citation (or the FAQ fast path);",
        "declined = unanswerable questions answered without citing a policy",
        f"retrieval latency: p50 {report.p50_ms:.2f} ms, p99 {report.p99_ms:.2f} ms "
        f"({report.chunks} chunks, the service's search)",
    ]
    if report.scaled_chunks:
        lines.append(
            f"scaled index: p50 {report.scaled_p50_ms:.2f} ms, p99 {report.scaled_p99_ms:.2f} ms "
            f"({report.scaled_chunks} chunks, lexical search in one thread)"
        )
    lines.append("")
    hit = "met" if report.hit3_met else "NOT met"
    lines.append(f"target hit@3 >= {HIT3_TARGET:.0%}: {hit} ({report.overall.hit3:.1%})")
    if report.latency_met is not None:
        lat = "met" if report.latency_met else "NOT met"
        lines.append(
            f"target p99 <= {P99_TARGET_MS:g} ms at {report.scaled_chunks} chunks: {lat} "
            f"({report.scaled_p99_ms:.2f} ms)"
        )
    misses = report.misses()
    if show_misses and misses:
        lines += ["", f"misses ({len(misses)}):"]
        for o in misses[:show_misses]:
            want = ",".join(o.question.sources) or "(nothing)"
            lines.append(
                f"  {o.question.id:<12} want {want:<24} got {','.join(o.found) or '(nothing)'}"
                f"  {o.question.question}"
            )
    return "\n".join(lines)


def summarise(
    outcomes: list[Outcome], chunks: int, scaled: tuple[int, list[float]] | None = None
) -> Report:
    ms = [o.ms for o in outcomes]
    report = Report(outcomes, chunks, percentile(ms, 50), percentile(ms, 99))
    if scaled is not None:
        n, scaled_ms = scaled
        report.scaled_chunks = n
        report.scaled_p50_ms = percentile(scaled_ms, 50)
        report.scaled_p99_ms = percentile(scaled_ms, 99)
    return report


# --- a run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """What the bot answered to a question."""

    text: str
    cited: bool  # it cites the shop's documents
    fast_path: bool = False  # a routing FAQ answer: the shop's own text, no model, no citation


Answer = Callable[[Question], Awaitable[Reply]]


async def open_demo_base(
    workdir: Path,
    docs: Path = DEMO_DOCS,
    settings: KnowledgeSettings | None = None,
    providers: Sequence[Provider] = (),
) -> tuple[KnowledgeBase, Database, list[str]]:
    """A knowledge base with `docs` in a fresh SQLite database under `workdir`, and the
    files that could not be added (with their reasons). `providers`: the deployment's, for
    `settings.embeddings`. Close the database when done."""
    from storage import db as dbs
    from storage import executor

    url = f"sqlite+aiosqlite:///{workdir / 'knowledge-eval.db'}"
    engine = dbs.create_engine(url)
    try:
        await dbs.upgrade(engine)
    finally:
        await engine.dispose()
    engine = dbs.create_engine(url)
    database = executor.for_engine(engine)
    await engine.dispose()
    kb = await KnowledgeBase.open(database, settings or KnowledgeSettings(), providers=providers)
    added, failed = await kb.add_many([docs], collection=DEFAULT_COLLECTION)
    if not added:
        await database.close()
        raise KnowledgeError(f"{docs}: no document could be added")
    return kb, database, [f"{f.source}: {f.reason}" for f in failed]


async def evaluate(
    questions: Sequence[Question],
    kb: KnowledgeBase,
    *,
    collection: str = DEFAULT_COLLECTION,
    scale_to: int = 10_000,
    answer: Answer | None = None,
) -> Report:
    """Retrieval figures for `questions` on `kb`'s `collection`, latency on an index scaled
    to `scale_to` chunks (0: skip), and answer coverage when `answer` is given."""

    async def search(q: str) -> list[Passage]:
        return await kb.search(q, collection=collection, k=3)

    index = await kb.index(collection)
    outcomes = await run_retrieval(questions, search)
    scaled: tuple[int, list[float]] | None = None
    if scale_to:
        big = await asyncio.to_thread(
            lambda: CollectionIndex(scaled_chunks(index.chunks, max(scale_to, index.size)))
        )
        ms = await asyncio.to_thread(
            time_searches,
            lexical_search(big, kb.settings.min_relevance),
            [q.question for q in questions],
        )
        scaled = (big.size, ms)
    if answer is not None:
        for o in outcomes:
            reply = await answer(o.question)
            o.answer, o.fast_path = reply.text, reply.fast_path
            if o.question.answerable:
                o.answer_ok = (reply.cited or reply.fast_path) and all(
                    has_fact(reply.text, f) for f in o.question.facts
                )
            else:  # nothing to cite: a cited answer took a policy from the wrong page
                o.answer_ok = not reply.cited
    return summarise(outcomes, index.size, scaled)
