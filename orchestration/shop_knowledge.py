"""The shop's documents in a turn: the built-in `search_knowledge` tool, the passages a
specialist reads in its system prompt, and the source line under an answer that cites them.

Passages are numbered once per turn (`Sources`), so specialists answering the parts of one
message never give one number to two passages, and the service can resolve the [n] markers
of the joined answer. The collection always comes from the conversation (its channel and
account), never from the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from knowledge.base import KnowledgeSearch, Passage
from orchestration.language import language, mostly_chinese

log = structlog.get_logger(__name__)

SEARCH_KNOWLEDGE = "search_knowledge"
MAX_QUERY_CHARS = 500
NOTHING_FOUND_NOTE = (
    "nothing in the shop's documents answers this: do not guess a policy; say you will check "
    "and offer a colleague"
)
TOOL_DEFINITION: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": SEARCH_KNOWLEDGE,
        "description": (
            "Search the shop's own documents (rules and policies: returns, shipping, "
            "warranty, invoices, payment, coupons; product pages) for passages that answer "
            "the shopper's question. Returns numbered passages: cite them as [n]."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "what to look up, in the shopper's words",
                }
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}

# The lines of the prompt block; the simulator reads passages back by them.
PASSAGES_HEADER = (
    "Shop documents found for this message. Answer questions about the shop's rules and "
    "policies only from them, and put the number of each passage you use in brackets after "
    "what you took from it, e.g. [1]. If they do not answer the question, say you will check "
    "and offer a colleague; never guess a policy."
)
NOTHING_FOUND_HEADER = (
    "Shop documents: nothing in the shop's documents answers this message. Never guess a "
    "rule or a policy. If the shopper asks about the shop's rules or policies (returns, "
    "shipping, warranty, invoices, payment, coupons, services), reply with exactly the text "
    "on the next line and nothing else:"
)
NOTHING_FOUND_FOOTER = (
    "(Order, parcel, coupon and product lookups still use your tools. When the message asks "
    "several things, first search_knowledge for the part you answer.)"
)
PASSAGE_INDENT = "    "

# [1], [1][2], [1, 2] and the full-width 【1】 Chinese models like to write.
_MARKER = re.compile(r"[\[【]\s*(\d{1,3}(?:\s*[,，、]\s*\d{1,3})*)\s*[\]】]")
_SOURCE_LABEL = {"zh": "来源：", "ja": "出典：", "vi": "Nguồn: ", "en": "Source: "}
_SOURCES_LABEL = {"zh": "来源：", "ja": "出典：", "vi": "Nguồn: ", "en": "Sources: "}


def cited_numbers(text: str) -> list[int]:
    """The passage numbers `text` cites, in order of first mention."""
    found: list[int] = []
    for m in _MARKER.finditer(text):
        for part in re.split(r"[,，、]", m.group(1)):
            n = int(part.strip())
            if n not in found:
                found.append(n)
    return found


class Sources:
    """The passages shown to the specialists of one turn, numbered from 1 in the order they
    were first shown; the same chunk keeps its number."""

    def __init__(self) -> None:
        self._passages: list[Passage] = []
        self._number_of: dict[int, int] = {}

    def number(self, passage: Passage) -> int:
        n = self._number_of.get(passage.chunk_id)
        if n is None:
            self._passages.append(passage)
            n = self._number_of[passage.chunk_id] = len(self._passages)
        return n

    def get(self, n: int) -> Passage | None:
        return self._passages[n - 1] if 0 < n <= len(self._passages) else None

    def __len__(self) -> int:
        return len(self._passages)

    def cited(self, text: str) -> list[tuple[int, Passage]]:
        """The known passages `text` cites, in order of first mention (unknown numbers, a
        model's invention, are left out)."""
        out = []
        for n in cited_numbers(text):
            p = self.get(n)
            if p is not None:
                out.append((n, p))
        return out


# Where one question of a message ends and the next begins ("…? And …", "…。还有，…").
_PART_BREAK = re.compile(
    r"(?<=[?？!！。；;])\s*|\n+|(?:还有|另外|顺便问一下|顺便问下)[，,]?|"
    r"(?<![A-Za-z])(?:and also|also|by the way|btw)\b,?",
    re.IGNORECASE,
)
MAX_PARTS = 4


def question_parts(message: str) -> list[str]:
    """The questions of a message that asks several things, each as its own search (a
    passage that answers one part rarely matches the words of the whole message)."""
    parts = [p.strip(" ,，、") for p in _PART_BREAK.split(message)]
    parts = [p for p in parts if len(p) >= 4]
    return parts[:MAX_PARTS] if len(parts) > 1 else []


def merge_found(results: Sequence[Sequence[Passage]], limit: int) -> list[Passage]:
    """Passages of several searches, taken in turn from each (best first), each once."""
    merged: list[Passage] = []
    seen: set[int] = set()
    for rank in range(max((len(r) for r in results), default=0)):
        for found in results:
            if rank < len(found) and found[rank].chunk_id not in seen:
                seen.add(found[rank].chunk_id)
                merged.append(found[rank])
    return merged[:limit]


def _label_language(question: str) -> str:
    lang = language(question)
    if lang == "ja":
        return "ja"  # (kanji with kana)
    if mostly_chinese(question):
        return "zh"
    return lang if lang == "vi" else "en"


def source_line(cited: Sequence[tuple[int, Passage]], question: str) -> str:
    """The line naming the cited documents in the shopper's language, e.g. "Source: [1]
    Returns & refunds — https://…"; passages of one document share one entry ("[1][2] …")."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    for n, p in cited:
        groups.setdefault((p.title or p.source, p.url), []).append(n)
    lang = _label_language(question)
    entries = []
    for (title, url), numbers in groups.items():
        marks = "".join(f"[{n}]" for n in numbers)
        entries.append(f"{marks} {title}" + (f" — {url}" if url else ""))
    label = (_SOURCES_LABEL if len(entries) > 1 else _SOURCE_LABEL)[lang]
    return label + ("；" if lang == "zh" else "; ").join(entries)


def _heading(p: Passage) -> str:
    return f"{p.title} › {p.heading}" if p.heading else p.title


_ITEM_START = re.compile(r"^(?:[-*•]\s|\d{1,2}[.)]\s)")
_CJK_END = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uf900-\uffef]$")
_CJK_START = re.compile(r"^[\u3000-\u30ff\u3400-\u9fff\uf900-\uffef]")


def unwrap(text: str) -> list[str]:
    """A passage's paragraphs and list items, one per line: the line breaks a document was
    wrapped with are joined (without a space between CJK characters)."""
    units: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        current = ""
        for raw in paragraph.splitlines():
            line = raw.strip()
            if not line:
                continue
            if not current or _ITEM_START.match(line):
                if current:
                    units.append(current)
                current = line
            elif _CJK_END.search(current) and _CJK_START.match(line):
                current += line
            else:
                current += " " + line
        if current:
            units.append(current)
    return units


def passages_block(numbered: Iterable[tuple[int, Passage]]) -> str:
    """The passages as a specialist's system prompt shows them: "[1] Title › heading — url:"
    and below it the text, one indented line per paragraph or list item."""
    lines = [PASSAGES_HEADER]
    for n, p in numbered:
        head = f"[{n}] {_heading(p)}" + (f" — {p.url}" if p.url else "") + ":"
        lines.append(head)
        lines.extend(PASSAGE_INDENT + unit for unit in unwrap(p.text))
    return "\n".join(lines)


def nothing_found_block(no_knowledge_text: str) -> str:
    return "\n".join(
        [NOTHING_FOUND_HEADER, " ".join(no_knowledge_text.split()), NOTHING_FOUND_FOOTER]
    )


@dataclass(slots=True)
class TurnKnowledge:
    """What one turn knows of the shop's documents: its collection, the passages found for
    the shopper's message before any model call, and every passage shown since."""

    search: KnowledgeSearch
    collection: str
    no_knowledge_text: str  # in the shopper's language
    found: list[Passage] = field(default_factory=list)
    sources: Sources = field(default_factory=Sources)

    def __post_init__(self) -> None:
        for p in self.found:
            self.sources.number(p)

    def prompt_block(self) -> str:
        """What a specialist with `search_knowledge` reads in its system prompt."""
        if not self.found:
            return nothing_found_block(self.no_knowledge_text)
        return passages_block((self.sources.number(p), p) for p in self.found)

    async def call(self, arguments_json: str) -> str:
        """Run one `search_knowledge` call of a model: the result as JSON for the model."""
        try:
            args = json.loads(arguments_json or "{}")
        except ValueError:
            return _error('arguments must be JSON like {"query": "return opened earbuds"}')
        query = args.get("query") if isinstance(args, dict) else None
        if not isinstance(query, str) or not query.strip():
            return _error('"query" must be a non-empty string: what to look up')
        try:
            passages = await self.search.search(
                query.strip()[:MAX_QUERY_CHARS], collection=self.collection
            )
        except Exception:
            log.exception("knowledge_search_failed", collection=self.collection)
            return _error("the shop's documents could not be searched just now")
        if not passages:
            return json.dumps({"passages": [], "note": NOTHING_FOUND_NOTE}, ensure_ascii=False)
        return json.dumps(
            {
                "passages": [
                    {
                        "n": self.sources.number(p),
                        "title": p.title,
                        "heading": p.heading,
                        "text": p.text,
                        "url": p.url,
                    }
                    for p in passages
                ]
            },
            ensure_ascii=False,
        )

    def source_line(self, answer: str, question: str) -> str | None:
        """The line that names the documents `answer` cites; None when it cites none."""
        cited = self.sources.cited(answer)
        return source_line(cited, question) if cited else None


def _error(detail: str) -> str:
    return json.dumps({"error": detail}, ensure_ascii=False)
