"""One collection's in-memory search index: BM25 (bm25s) over the chunks' stored terms,
optionally fused with embedding similarity.

BM25 scores are unbounded and only comparable within one query, so they can't say "nothing
here answers this". Relevance is decided by something normalised instead: the idf-weighted
share of the question's terms that a chunk contains. "Do you sell cars?" shares "sell" with
a FAQ at most: far below the bar; "can I return opened earbuds?" finds return + open +
earbud in one chunk.

A shop's first document must work too, so the weights don't trust a small collection's
counts: idf is taken as if the collection held at least IDF_MIN_CHUNKS chunks ("return" in
every chunk of a returns policy is still a word of the question), and a word the collection
never saw weighs no more than its typical word (the shopper's "fit" is not evidence against
the returns policy; it may just be a word the policy doesn't use).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import bm25s  # type: ignore[import-untyped]
import numpy as np

from knowledge.base import Passage
from knowledge.tokenize import BIGRAM_JOIN, is_bigram, language, strip_diacritics
from storage.knowledge import StoredChunk

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# How many BM25 leaders are checked for relevance (a few times k is plenty).
CANDIDATES = 50
# Reciprocal rank fusion's damping constant (the usual value).
RRF_K = 60
# Relevance weights treat a smaller collection as part of one this big (see above).
IDF_MIN_CHUNKS = 300
# Among relevant passages, one in the question's language (script) is preferred: the answer
# must come back in the shopper's language, and quoting the English page to a Chinese
# question makes the model translate policy text.
SAME_LANGUAGE_BOOST = 2.0
# English typos: an unknown word this long may stand for a known word this close (edits).
TYPO_MIN_LETTERS = {1: 5, 2: 8}
_LATIN_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True, slots=True)
class Hit:
    chunk: StoredChunk
    score: float
    relevance: float


class CollectionIndex:
    """Immutable once built (a rebuild makes a new one), so searches need no lock."""

    def __init__(self, chunks: Sequence[StoredChunk]) -> None:
        self.chunks = list(chunks)
        self.size = len(self.chunks)
        tokens = [c.terms.split() for c in self.chunks]
        self._term_sets = [frozenset(t) for t in tokens]
        self._texts = [
            unicodedata.normalize("NFKC", f"{c.title}\n{c.heading}\n{c.text}").lower()
            for c in self.chunks
        ]
        # A document's title says what all of it is about (a match there is no coincidence;
        # a section heading's "times" for "what time is it in London" may be).
        titles = [unicodedata.normalize("NFKC", c.title).lower() for c in self.chunks]
        self._titles = [f"{t} {strip_diacritics(t)}" for t in titles]
        self._languages = [language(t) for t in self._texts]
        df: Counter[str] = Counter()
        for s in self._term_sets:
            df.update(s)
        self._df = df
        n = self.size
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        assumed = max(n, IDF_MIN_CHUNKS)
        self._weight = {t: math.log(1 + (assumed - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        weights = sorted(self._weight.values())
        self._unknown_weight = weights[len(weights) // 2] if weights else 1.0
        # Unknown English words may be typos of these: every known word of TYPO_MIN_LETTERS
        # letters or more under itself and each of its one-letter deletions.
        self._typos: dict[str, list[str]] = {}
        for term in self._idf:
            if len(term) >= TYPO_MIN_LETTERS[1] - 1 and _LATIN_WORD.fullmatch(term):
                for key in {term, *_deletions(term)}:
                    self._typos.setdefault(key, []).append(term)
        self._bm25: bm25s.BM25 | None = None
        if n:
            self._bm25 = bm25s.BM25(method="lucene")
            self._bm25.index(tokens, show_progress=False)
        vectors = [c.embedding for c in self.chunks]
        self._vector_rows = [i for i, v in enumerate(vectors) if v]
        self._vectors: np.ndarray | None = None
        if self._vector_rows:
            m = np.array([vectors[i] for i in self._vector_rows], dtype=np.float32)
            norms = np.linalg.norm(m, axis=1, keepdims=True)
            self._vectors = m / np.maximum(norms, 1e-9)

    @property
    def has_vectors(self) -> bool:
        return self._vectors is not None

    def relevance(self, query_terms: Sequence[str], row: int) -> tuple[float, bool]:
        """The weighted share of the query's (unigram) terms chunk `row` contains (0 when
        what they share looks like a coincidence), and whether it shares one word only, one
        its document's title has."""
        unigrams = {t for t in query_terms if not is_bigram(t)}
        if not unigrams:
            return 0.0, False
        have = self._term_sets[row]
        bigrams = [t for t in query_terms if is_bigram(t)]
        # Vietnamese syllables of a two-syllable word the collection never saw ("ngày mai",
        # tomorrow) say nothing about a chunk that has them apart ("ngày", "khuyến mãi").
        loose = {
            strip_diacritics(s) for b in bigrams if b not in self._idf for s in b.split(BIGRAM_JOIN)
        } - {strip_diacritics(s) for b in bigrams if b in have for s in b.split(BIGRAM_JOIN)}
        total = matched = 0.0
        found: set[str] = set()
        for t in unigrams:
            w = self._weight.get(t, self._unknown_weight)
            total += w
            # CJK words: the chunk's text decides, not its segmentation (jieba may cut the
            # question's "积分怎么抵扣" and the page's "积分抵扣规则" differently).
            if t in have or (_CJK.match(t) is not None and t in self._texts[row]):
                matched += w
                if strip_diacritics(t) not in loose:
                    found.add(strip_diacritics(t))
        # One shared word of a question of several is a coincidence ("weather" in a jacket's
        # page for "what's the weather tomorrow"), however rare the word, unless the document
        # is about it: "return" in "Returns and refunds" for "can I return it if it doesn't
        # fit?" (lexical() keeps these only when nothing shares more).
        distinct = len({strip_diacritics(t) for t in unigrams})
        by_title = distinct >= 2 and len(found) < 2
        if by_title and not self._topical(found, row):
            return 0.0, False
        # Vietnamese words are syllables: "ngày" and "mua" match anywhere, "ngày mai" (tomorrow)
        # doesn't. A Vietnamese question shares a two-syllable word with the chunk, or at
        # least three syllables.
        if bigrams and len(found) < 3 and not any(b in have for b in bigrams):
            return 0.0, False
        return (matched / total if total else 0.0), by_title

    def _topical(self, found: set[str], row: int) -> bool:
        """The one word a question shares with chunk `row` is in its document's title."""
        if len(found) != 1:
            return False
        [word] = found
        if _CJK.match(word) is not None:
            return word in self._titles[row]
        # Terms are stems ("return", "polici"): a word of the title starts with it.
        return re.search(rf"(?<!\w){re.escape(word)}", self._titles[row]) is not None

    def lexical(
        self, query_terms: Sequence[str], min_relevance: float, query_language: str = ""
    ) -> list[Hit]:
        """Chunks that pass the relevance bar, best (BM25) first; those in `query_language`
        (tokenize.language of the question) weigh more."""
        if self._bm25 is None:
            return []
        query_terms = self.corrected(query_terms)
        known = [t for t in dict.fromkeys(query_terms) if t in self._idf]
        if not known:
            return []
        scores = self._bm25.get_scores(known)
        positive = np.flatnonzero(scores > 0)
        if positive.size > CANDIDATES:
            top = positive[np.argpartition(-scores[positive], CANDIDATES)[:CANDIDATES]]
        else:
            top = positive
        hits: list[Hit] = []
        by_title: list[tuple[int, Hit]] = []
        for row in top.tolist():
            rel, title_only = self.relevance(query_terms, row)
            if rel >= min_relevance:
                # BM25 orders by how much of the chunk is about the words; coverage says how
                # many of them it has ("保修需要发票吗": the warranty page with both, above
                # the invoice pages that say "发票" often).
                score = float(scores[row]) * rel
                if query_language and self._languages[row] == query_language:
                    score *= SAME_LANGUAGE_BOOST
                hit = Hit(self.chunks[row], score, rel)
                if title_only:
                    by_title.append((row, hit))
                else:
                    hits.append(hit)
        if hits or not by_title:
            # "Who pays for the return label?": the passage on return labels, not every
            # passage of the returns policy that says "return".
            return sorted(hits, key=lambda h: -h.score)
        # The question names only what a document is about ("can I return it if it doesn't
        # fit?"): its general rule first, which documents put first (rows keep the
        # documents' order); the best-scoring document first.
        best: dict[int, float] = {}
        for _, h in by_title:
            best[h.chunk.document_id] = max(best.get(h.chunk.document_id, 0.0), h.score)
        by_title.sort(key=lambda rh: (-best[rh[1].chunk.document_id], rh[0]))
        return [h for _, h in by_title]

    def corrected(self, query_terms: Sequence[str]) -> list[str]:
        """`query_terms` with each unknown English word of TYPO_MIN_LETTERS letters or more
        replaced by the known word closest to it ("retrun" -> "return", "opend" -> "open"),
        if one is near enough; the commonest wins a tie."""
        out = list(query_terms)
        for i, t in enumerate(out):
            if t in self._idf or len(t) < TYPO_MIN_LETTERS[1] or not _LATIN_WORD.fullmatch(t):
                continue
            limit = 2 if len(t) >= TYPO_MIN_LETTERS[2] else 1
            best: tuple[int, int, str] | None = None
            for candidate in self._typo_candidates(t):
                d = _edit_distance(t, candidate, limit)
                if d <= limit:
                    key = (d, -self._df[candidate], candidate)
                    best = key if best is None or key < best else best
            if best is not None:
                out[i] = best[2]
        return out

    def _typo_candidates(self, word: str) -> set[str]:
        """Known words sharing a one-letter deletion with `word` (or equal to one of its
        deletions, or having it as one): every word within one edit, and most within two."""
        found: set[str] = set()
        for key in {word, *_deletions(word)}:
            found.update(self._typos.get(key, ()))
        return found

    def similar(self, query_vector: Sequence[float], min_similarity: float) -> list[Hit]:
        """Chunks whose embedding is at least `min_similarity` (cosine) from the query's."""
        if self._vectors is None:
            return []
        q = np.asarray(query_vector, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        if norm == 0 or q.shape[0] != self._vectors.shape[1]:
            return []
        cos = self._vectors @ (q / norm)
        order = np.argsort(-cos)[:CANDIDATES]
        return [
            Hit(self.chunks[self._vector_rows[i]], float(cos[i]), float(cos[i]))
            for i in order.tolist()
            if cos[i] >= min_similarity
        ]

    def search(
        self,
        query_terms: Sequence[str],
        *,
        k: int,
        min_relevance: float,
        query_vector: Sequence[float] | None = None,
        min_similarity: float = 0.5,
        query_language: str = "",
    ) -> list[Passage]:
        lexical = self.lexical(query_terms, min_relevance, query_language)
        if query_vector is None or self._vectors is None:
            return [_passage(h.chunk, h.score) for h in lexical[:k]]
        semantic = self.similar(query_vector, min_similarity)
        fused: dict[int, float] = {}
        by_id: dict[int, StoredChunk] = {}
        for ranking in (lexical, semantic):
            for rank, h in enumerate(ranking):
                fused[h.chunk.id] = fused.get(h.chunk.id, 0.0) + 1.0 / (RRF_K + rank + 1)
                by_id[h.chunk.id] = h.chunk
        best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
        return [_passage(by_id[cid], score) for cid, score in best]


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`; more than
    `limit` apart in length: limit + 1 without counting."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def _passage(c: StoredChunk, score: float) -> Passage:
    return Passage(
        chunk_id=c.id,
        document_id=c.document_id,
        collection=c.collection,
        source=c.source,
        title=c.title,
        heading=c.heading,
        text=c.text,
        url=c.url,
        version=c.version,
        score=round(score, 6),
    )
