"""Routing FAQ entries (the no-model fast path) generated from the shop's Q&A pages.

A Q&A is a section whose heading is a question ("## Can I change my delivery address?") or a
"Q: ... / A: ..." pair in the text. The language versions of one page (faq.en.md,
faq.zh.md) are translations in the same order, so their n-th Q&As become one entry with an
answer per language. Each entry matches a message containing all (at most three) content
words of one of its questions, or the question itself: precise rather than eager, because
a wrong canned answer is worse than a model's answer. The entries are plain data shaped like
the `faq:` entries of `routing:` (orchestration/routing/config.py FaqSpec); the caller
checks them against FaqSpec and may set each entry's intent (the default team routes by it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import yaml

from knowledge import tokenize
from knowledge.sources import HEADING_SEP, read_document
from storage.knowledge import StoredChunk

# Words too common in shop questions to tell two of them apart.
_WEAK_EN = frozenset(
    """already still just also ever really much many take use need there any offer u
    someone something anything else way""".split()
)
_STOP_ZH_VERBS = frozenset("能 可以 是 有 要 会 想 用来 还 吗 呢 不 没".split())
_KEEP_ZH_POS = ("n", "v", "vn", "nz", "ns", "nr", "s", "eng", "j", "l", "i")
_MAX_WORDS = 3
_Q_LINE = re.compile(r"^\s*(?:Q|问|質問|Hỏi)\s*[:：.、]\s*(.+)$", re.IGNORECASE)
_A_LINE = re.compile(r"^\s*(?:A|答|回答|Đáp)\s*[:：.、]\s*(.+)$", re.IGNORECASE)
_QUESTION_END = ("?", "？")
_HAN = re.compile(r"[\u3400-\u9fff]")
# CJK characters and punctuation: wrapped lines join with no space between them.
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]")
_KANA = re.compile(r"[\u3040-\u30ff]")


@dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str
    lang: str
    page: str  # the page's slug: faq.en.md -> faq
    url: str | None


def page_of(source: str) -> tuple[str, str | None]:
    """(slug, language) from a file name: /x/faq.zh.md -> ("faq", "zh"); faq.md -> ("faq",
    None)."""
    name = re.split(r"[\\/]", source.rstrip("/\\"))[-1]
    parts = name.split(".")
    return parts[0].lower(), (parts[1].lower() if len(parts) >= 3 else None)


def detect_lang(text: str) -> str:
    if _KANA.search(text):
        return "ja"
    if _HAN.search(text):
        return "zh"
    if any(tokenize._is_vietnamese(w) for w in text.split()):
        return "vi"
    return "en"


def _is_question(heading: str) -> bool:
    return heading.rstrip().endswith(_QUESTION_END)


def _join(lines: Iterable[str]) -> str:
    """Paragraph lines as one answer: the breaks a file was wrapped with are joined (with no
    space between CJK characters)."""
    out = ""
    for raw in lines:
        line = " ".join(raw.split())
        if not line:
            continue
        if out and (_CJK.match(out[-1]) or _CJK.match(line[0])):
            out += line
        else:
            out = f"{out} {line}" if out else line
    return out


def qa_pairs(
    sections: Sequence[tuple[str, str]], *, source: str, url: str | None = None
) -> list[QA]:
    """The Q&As of one document, given as (heading path, text) in order."""
    page, lang = page_of(source)
    found: list[tuple[str, str]] = []
    last_q: str | None = None
    for heading, text in sections:
        title = heading.split(HEADING_SEP)[-1].strip()
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        if title and _is_question(title):
            answer = _join(line for p in paragraphs for line in p.splitlines())
            if found and last_q == title:  # a long answer chunked in two: one answer
                found[-1] = (title, f"{found[-1][1]} {answer}".strip())
            elif answer:
                found.append((title, answer))
            last_q = title
            continue
        last_q = None
        question: str | None = None
        answer_lines: list[str] = []
        for line in text.splitlines():
            q = _Q_LINE.match(line)
            a = _A_LINE.match(line)
            if q:
                if question and answer_lines:
                    found.append((question, _join(answer_lines)))
                question, answer_lines = q.group(1).strip(), []
            elif a and question:
                answer_lines = [a.group(1)]
            elif question and answer_lines and line.strip():
                answer_lines.append(line)
            elif question and answer_lines and not line.strip():
                found.append((question, _join(answer_lines)))
                question, answer_lines = None, []
        if question and answer_lines:
            found.append((question, _join(answer_lines)))
    return [QA(q, a, lang or detect_lang(q), page, url) for q, a in found]


def qas_from_chunks(chunks: Sequence[StoredChunk]) -> list[QA]:
    """The Q&As of a collection's stored chunks (each document's in its own order)."""
    by_doc: dict[int, list[StoredChunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.document_id, []).append(c)
    out: list[QA] = []
    for doc_chunks in by_doc.values():
        doc_chunks.sort(key=lambda c: c.id)
        first = doc_chunks[0]
        out.extend(
            qa_pairs([(c.heading, c.text) for c in doc_chunks], source=first.source, url=first.url)
        )
    return out


def qas_from_file(path: str) -> list[QA]:
    """The Q&As of one file (any kind the knowledge base reads)."""
    doc = read_document(path)
    sections = [(s.heading, "\n\n".join(s.paragraphs)) for s in doc.sections]
    return qa_pairs(sections, source=doc.source, url=doc.url)


def content_words(question: str, lang: str) -> list[str]:
    """The (at most three) words a message must contain to ask this question ([]: match
    the question word for word)."""
    if lang in ("zh", "ja") and _HAN.search(question) and not _KANA.search(question):
        import jieba.posseg as posseg  # type: ignore[import-untyped]

        tokenize._jieba_module()  # initialised once, quietly
        words = [
            w.word
            for w in posseg.cut(question)
            if w.flag.startswith(_KEEP_ZH_POS)
            and w.word not in _STOP_ZH_VERBS
            and w.word not in tokenize.STOPWORDS_ZH
        ]
    elif lang == "en" or (lang != "vi" and not _HAN.search(question)):
        raw = [w.lower() for w in re.findall(r"[^\W\d_]+(?:'[a-z]+)?", question)]
        words = [w for w in raw if w not in tokenize.STOPWORDS_EN and len(w) > 1]
        if len(words) > _MAX_WORDS:
            words = [w for w in words if w not in _WEAK_EN] or words
    else:
        # Japanese and Vietnamese words span several tokens or syllables: matching some of
        # them would be loose, so those questions match word for word only.
        return []
    words = list(dict.fromkeys(words))
    if len(words) > _MAX_WORDS:
        keep = set(sorted(words, key=len, reverse=True)[:_MAX_WORDS])
        words = [w for w in words if w in keep][:_MAX_WORDS]
    return words


def _stem_prefix(word: str) -> str:
    """An English word's prefix its inflections share: delivery -> deliver, wrapping ->
    wrap (the word and its stem's common start, at least 3 letters)."""
    if not word.isascii():
        return word
    stem = tokenize._stem(word)
    n = 0
    while n < min(len(word), len(stem)) and word[n] == stem[n]:
        n += 1
    return word[:n] if n >= 3 else word


def pattern_for(words: Sequence[str]) -> str | None:
    """A regex matching a message that contains every word (in any order)."""
    if len(words) < 2 and not (words and len(words[0]) >= 4 and not words[0].isascii()):
        return None  # one word says too little (the question itself is a keyword still)
    parts = []
    for w in words:
        esc = re.escape(_stem_prefix(w))
        parts.append(rf"\b{esc}" if w.isascii() else esc)
    first = "|".join(parts)
    # Not when the message names an order or parcel number: that one is looked up.
    return r"^(?!.*\d{4})" + "".join(f"(?=.*{p})" for p in parts) + f".*?(?:{first})"


def _name(qas: Sequence[QA], n: int) -> str:
    en = next((q for q in qas if q.lang == "en"), None)
    words = content_words(en.question, "en") if en else []
    base = "_".join(
        unicodedata.normalize("NFKD", w).encode("ascii", "ignore").decode() for w in words
    ).strip("_")
    return f"kb_{qas[0].page}_{base or n}"


def faq_entries(qas: Sequence[QA]) -> list[dict[str, object]]:
    """One routing FAQ entry per question (language versions of a page merged)."""
    by_page: dict[str, dict[str, list[QA]]] = {}
    for qa in qas:
        by_page.setdefault(qa.page, {}).setdefault(qa.lang, []).append(qa)
    groups: list[list[QA]] = []
    for langs in by_page.values():
        counts = {len(v) for v in langs.values()}
        if len(counts) == 1:  # translations in the same order: pair them
            groups.extend([v[i] for v in langs.values()] for i in range(counts.pop()))
        else:  # can't tell which is which: each language on its own
            groups.extend([qa] for v in langs.values() for qa in v)
    entries: list[dict[str, object]] = []
    names: set[str] = set()
    for n, group in enumerate(groups, start=1):
        name = _name(group, n)
        while name in names:
            name = f"{name}_{n}"
        names.add(name)
        keywords: list[str] = []
        patterns: list[str] = []
        for qa in group:
            pattern = pattern_for(content_words(qa.question, qa.lang))
            if pattern:
                patterns.append(pattern)
            else:  # the question itself, word for word
                keywords.append(qa.question.rstrip("?？ ").strip())
        entry: dict[str, object] = {"name": name, "intent": "other"}
        if keywords:
            entry["keywords"] = keywords
        if patterns:
            entry["patterns"] = patterns
        entry["questions"] = [qa.question for qa in group]
        entry["answers"] = {qa.lang: qa.answer for qa in group}
        entries.append(entry)
    return entries


def to_yaml(entries: Sequence[dict[str, object]]) -> str:
    """The entries as YAML to paste under `routing:` `faq:`."""
    body = yaml.safe_dump(
        list(entries), allow_unicode=True, sort_keys=False, width=100, default_flow_style=None
    )
    return "# Generated from the knowledge base's Q&A pages: paste under `routing:` `faq:`\n" + body
