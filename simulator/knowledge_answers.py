"""The simulator answering from the shop's documents, the way a careful model does.

A specialist that reads the shop's documents gets passages in its system prompt
(orchestration/shop_knowledge.py) or from a `search_knowledge` call. For a question about
the shop's rules the simulator answers with the few sentences of the passages that answer
it best (see `answer`: rare shared words, the section heading, the search's ranking, a
table's row; in the shopper's language when a passage in it says something), each group
followed by its [n]; when the prompt says nothing was found, a rules question gets the
no-knowledge text the prompt gives, word for word. A specialist told to answer one part of
the message reads for that part. Order, parcel and product lookups stay with the tools
(simulator.tool_choice), as before; whether two coupon codes combine is a rule.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from knowledge.tokenize import terms
from orchestration.language import language, mostly_chinese
from orchestration.shop_knowledge import (
    NOTHING_FOUND_FOOTER,
    NOTHING_FOUND_HEADER,
    PASSAGE_INDENT,
    PASSAGES_HEADER,
    SEARCH_KNOWLEDGE,
    unwrap,
)
from simulator.keywords import keyword_pattern
from simulator.parts import PART_RE, own_part
from simulator.tool_choice import PlannedCall, choose, strong_values

_PASSAGE_HEAD = re.compile(r"^\[(\d{1,3})\] (.*):$")
# Sentence ends: Latin ones before a space, CJK ones anywhere.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？])")
_ITEM_MARK = re.compile(r"^(?:[-*•]\s+|\d{1,2}[.)]\s+)")
_MAX_SENTENCES = 3
_INLINE_ITEM = re.compile(r"(?<=[.!?。！？])\s+[-*•]\s+")
_ENDED = re.compile(r"[.!?:;。！？：；]$")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_HYPHEN = re.compile(r"(?<=[A-Za-z])-(?=[A-Za-z])")
_NUMBER = re.compile(r"(?<![\d.])\d{1,4}(?:\.\d+)?(?![\d.])")
_TABLE_ROW = " | "

# What asking about a rule sounds like (not a lookup of the shopper's own order).
_RULE_WORDS = (
    "can i", "could i", "do you offer", "do you accept", "do you ship", "do you deliver",
    "do you charge", "do you provide", "do you support", "is it possible", "am i allowed",
    "allowed",
    "policy", "policies", "rule", "rules", "how long", "how many days", "how much is",
    "how much does", "how do i", "how to", "what if", "what happens", "fee", "fees",
    "free shipping", "deadline", "within", "warranty", "guarantee", "invoice", "fapiao",
    "receipt", "instalment", "installment", "stack", "combine", "price protection",
    "currency", "currencies", "什么币", "币种", "外币", "通貨", "ngoại tệ", "ngoai te",
    "可以", "能不能", "能否", "可不可以", "还能", "能退", "能换", "政策", "规定", "规则",
    "多久", "几天", "多少天", "运费", "包邮", "发票", "保修", "质保", "保价", "叠加", "怎么",
    "如何", "无理由", "分期", "支付方式",
    "できますか", "できる", "ますか", "ですか", "返品", "送料", "保証", "領収書", "請求書",
    "支払", "規約", "何日", "いつまで",
    "được không", "duoc khong", "có được", "co duoc", "chính sách", "chinh sach", "phí",
    "bao lâu", "bao lau", "đổi trả", "doi tra", "trả hàng", "tra hang", "bảo hành",
    "bao hanh", "hóa đơn", "hoa don", "thanh toán", "thanh toan", "miễn phí", "mien phi",
)  # fmt: skip
_RULE_RE = keyword_pattern(_RULE_WORDS)
# Vietnamese typed without its diacritics ("co tra duoc khong"): a few very common words.
_VI_BARE_RE = re.compile(r"\b(?:khong|duoc|cua|nhung|thi|roi|bao lau|bao nhieu|mua|hang)\b")
# The shopper asks where their own order, parcel or refund is (a lookup, not a rule).
_OWN_STATUS_RE = re.compile(
    r"\b(?:where(?:'s| is| are)|status of|track|has|have|did|when will)\b.{0,40}?"
    r"\bmy (?:order|parcel|package|delivery|shipment|refund|return)s?\b"
    r"|\bmy (?:order|parcel|package|delivery|shipment|refund)s? (?:status|arrive|arrived|shipped)"
    r"|我的(?:订单|快递|包裹|退款)[^，,。？?]{0,8}(?:到哪|状态|进度|发货了|到了|什么时候到|到账了|处理)"
    r"|(?:订单|快递|包裹)(?:到哪|到了吗|发货了吗)"
    r"|(?:私の)?(?:注文|荷物)は(?:どこ|いつ)"
    r"|đơn (?:hàng )?của (?:tôi|mình|em) (?:đâu|đến đâu)",
    re.IGNORECASE,
)
# Whether codes go together ("can I use SAVE50 and WELCOME10 on the same order").
_STACKING_RE = keyword_pattern(
    (
        "stack", "stacked", "combine", "combined", "together", "same order", "both", "叠加",
        "一起用", "一起使用", "同时用", "同时使用", "併用", "同時", "cùng lúc", "cung luc",
        "dùng chung", "dung chung",
    )
)  # fmt: skip
# What the catalogue and promotion tools know better than any document: stock, today's
# prices, the promotions running now.
_LIVE_DATA_RE = keyword_pattern(
    (
        "in stock", "stock", "available", "availability", "price", "prices", "how much",
        "do you have", "do you sell", "have you got", "recommend", "promotions", "deals",
        "on sale", "any discounts", "有货", "库存", "现货", "多少钱", "价格", "推荐", "有没有",
        "有什么活动", "促销", "在庫", "いくら", "còn hàng", "con hang", "giá",
    )
)  # fmt: skip


def asks_about_rules(question: str) -> bool:
    """Whether the question asks what the shop's rules allow (not what happened to an
    order): the questions the shop's documents answer."""
    return bool(_RULE_RE.search(question.lower()))


@dataclass(slots=True)
class Passage:
    n: int
    heading: str  # "Title › section — url"
    units: list[str] = field(default_factory=list)  # paragraphs and list items


@dataclass(slots=True)
class Documents:
    """What a request carries of the shop's documents."""

    passages: list[Passage] = field(default_factory=list)
    no_knowledge_text: str | None = None  # the prompt said nothing was found
    searched: bool = False  # a search_knowledge call already ran

    @property
    def present(self) -> bool:
        return bool(self.passages) or self.no_knowledge_text is not None


def read_documents(messages: Sequence[dict[str, Any]]) -> Documents:
    """The passages of the system prompt and of `search_knowledge` results, numbered as
    the service numbered them."""
    docs = Documents()
    system = next((str(m.get("content") or "") for m in messages if m.get("role") == "system"), "")
    lines = system.splitlines()
    for i, line in enumerate(lines):
        if line == NOTHING_FOUND_HEADER and i + 1 < len(lines):
            docs.no_knowledge_text = lines[i + 1].strip()
        if line == PASSAGES_HEADER:
            docs.passages.extend(_prompt_passages(lines[i + 1 :]))
    search_ids = {
        str(c.get("id"))
        for m in messages
        for c in m.get("tool_calls") or []
        if isinstance(c, dict) and (c.get("function") or {}).get("name") == SEARCH_KNOWLEDGE
    }
    for m in messages:
        if m.get("role") != "tool" or str(m.get("tool_call_id")) not in search_ids:
            continue
        docs.searched = True
        docs.passages.extend(_result_passages(m.get("content")))
    return docs


def _prompt_passages(lines: Sequence[str]) -> list[Passage]:
    found: list[Passage] = []
    for line in lines:
        head = _PASSAGE_HEAD.match(line)
        if head is not None:
            found.append(Passage(int(head.group(1)), head.group(2)))
        elif line.startswith(PASSAGE_INDENT) and found:
            found[-1].units.append(line.strip())
        elif line != NOTHING_FOUND_FOOTER:
            break  # the end of the block
    return found


def _result_passages(content: Any) -> list[Passage]:
    try:
        result = json.loads(content) if isinstance(content, str) else content
    except ValueError:
        return []
    raw = result.get("passages") if isinstance(result, dict) else None
    out: list[Passage] = []
    for p in raw if isinstance(raw, list) else []:
        if isinstance(p, dict) and isinstance(p.get("n"), int) and isinstance(p.get("text"), str):
            heading = " › ".join(str(p.get(k)) for k in ("title", "heading") if p.get(k))
            out.append(Passage(p["n"], heading, unwrap(p["text"])))
    return out


def _sentences(unit: str) -> list[str]:
    unit = _ITEM_MARK.sub("", unit).strip()
    out: list[str] = []
    # A list flattened into one line ("…removed. - Clothing…") is several items.
    for piece in _INLINE_ITEM.split(unit):
        out.extend(s.strip() for s in _SENTENCE_END.split(piece) if s.strip())
    return out


def _join(sentences: Sequence[str], *, items: bool = True) -> str:
    text = ""
    for s in sentences:
        cjk_before = bool(text) and not text[-1].isascii()
        if items and text and not _ENDED.search(text):
            # List items carry no full stop.
            text += "；" + s if cjk_before or not s[0].isascii() else "; " + s
            continue
        text += s if not text or (cjk_before and not s[0].isascii()) else " " + s
    return text


def _tongue(text: str) -> str:
    """The language a text is written in, as far as choosing passages goes (a mostly Chinese
    message with English words is Chinese)."""
    lang = language(text)
    if lang == "zh" and not mostly_chinese(text):
        return "en"
    return "vi" if lang == "en" and _VI_BARE_RE.search(text.lower()) else lang


def _words(text: str) -> set[str]:
    """The terms of a passage's text, with words written apart also read as one ("Hong
    Kong" is also "hongkong", "Wi-Fi" "wifi"), the way shoppers may type them."""
    found = set(terms(text))
    raw = _LATIN_WORD.findall(text)
    pairs = " ".join(a + b for a, b in pairwise(raw))
    if pairs:
        found.update(terms(pairs))
    return found


def _asked(question: str) -> set[str]:
    """The terms of the question (a hyphenated word also whole) and its numbers."""
    found = set(terms(question)) | _numbers(question)
    joined = _HYPHEN.sub("", question)
    if joined != question:
        found.update(terms(joined))
    return found


def _numbers(text: str) -> set[str]:
    """The numbers of `text` as terms of their own ("26", "26.0" and "26cm" are "#26"): how
    a reader finds the row of a size table."""
    return {f"#{float(m):g}" for m in _NUMBER.findall(text)}


def _shared(wanted: set[str], words: set[str]) -> set[str]:
    """The question's terms a sentence has: the same term, or for Latin words of four
    letters or more one that starts the other ("warm" and "warmth")."""
    shared = wanted & words
    for w in wanted - shared:
        if len(w) >= 4 and w.isascii() and w.isalpha():
            if any(_same_stem(w, x) for x in words):
                shared.add(w)
    return shared


def _same_stem(a: str, b: str) -> bool:
    """Whether one word starts the other and adds at most three letters ("warm", "warmth";
    "ship", "shiping"): a form the stemmer missed, or a typo."""
    short, long_ = sorted((a, b), key=len)
    return (
        len(short) >= 4 and len(long_) - len(short) <= 3 and long_.startswith(short)
        and long_.isascii()
    )  # fmt: skip


def _heading_text(heading: str) -> str:
    """A passage's "Title › section — url" heading without its link."""
    return heading.split(" — ", 1)[0]


def _section(heading: str) -> str:
    """The section part of a passage's heading (the title names the page or product every
    passage of it shares)."""
    head = _heading_text(heading)
    return head.rsplit(" › ", 1)[-1] if " › " in head else ""


@dataclass(slots=True)
class _Candidate:
    rank: int  # the passage's place in the search results (0: the best)
    position: int  # the sentence's place in its passage
    unit: int  # the paragraph or list item of its passage it belongs to
    passage: Passage
    sentence: str
    words: set[str]
    score: float = 0.0


def answer(question: str, passages: Sequence[Passage]) -> str | None:
    """The sentences of `passages` that answer `question` best (at most a few, in the order
    the passages give them), each group ending with its [n]; None when no sentence shares a
    term with it.

    Like a careful reader: a word few sentences use says more (idf within the passages); a
    section whose heading is the question's subject counts as a whole ("what's in the box");
    the search's best passage counts a little more; a sentence that introduces a list
    (ends with ":") or is very short comes with the sentence after it."""
    wanted = _asked(question)
    if not wanted:
        return None
    candidates: list[_Candidate] = []
    said: set[str] = set()
    for rank, p in enumerate(passages):
        in_passage = [(u, s) for u, unit in enumerate(p.units) for s in _sentences(unit)]
        for position, (u, sentence) in enumerate(in_passage):
            if sentence not in said:
                said.add(sentence)
                words = _words(sentence)
                if _TABLE_ROW in sentence:
                    words |= _numbers(sentence)  # a table row: its numbers say which
                candidates.append(_Candidate(rank, position, u, p, sentence, words))
    tongue = _tongue(question)
    # A model answers in the shopper's language: passages in it come first.
    # (Figures alone, a table row, are in every language.)
    mine = [
        c
        for c in candidates
        if _tongue(c.sentence) == tongue or not any(ch.isalpha() for ch in c.sentence)
    ]
    if any(_shared(wanted, c.words) for c in mine):
        candidates = mine
    if not candidates:
        return None
    n = len(candidates)
    shared_of = [_shared(wanted, c.words) for c in candidates]
    df = Counter(t for shared in shared_of for t in shared)
    heading_of = {id(p): _shared(wanted, _words(_heading_text(p.heading))) for p in passages}
    last = max(c.rank for c in candidates)
    for c, shared in zip(candidates, shared_of, strict=True):
        score = sum(1 + math.log(1 + n / df[t]) for t in shared)
        heading = heading_of[id(c.passage)]
        if heading:
            # The section is about what is asked: each of its sentences says something.
            score += sum(1 + math.log(1 + n / (1 + df[t])) for t in heading)
        if score:
            score *= 1 + 0.2 * (last - c.rank)
        c.score = score
    scored = [c for c in candidates if c.score > 0]
    if not scored:
        return None
    top = max(scored, key=lambda c: (c.score, -c.rank, -c.position))
    # Near the best sentence: more of its passage, and others' that say nearly as much (as
    # much, when the best passage's section is the question's subject).
    on_topic = bool(_shared(wanted, _words(_section(top.passage.heading))))
    bar = 1.0 if on_topic else 0.75
    near = [
        c
        for c in scored
        if 2 * c.score >= top.score
        and (c.passage is top.passage or (c.score >= bar * top.score and _shared(wanted, c.words)))
    ]
    limit = _MAX_SENTENCES + 1 if on_topic else _MAX_SENTENCES
    best = sorted(near, key=lambda c: (-c.score, c.rank, c.position))[:limit]
    chosen = {id(c) for c in best}

    def add(c: _Candidate) -> None:
        if id(c) not in chosen:
            chosen.add(id(c))
            best.append(c)

    # The best sentence's paragraph is read whole (when short; else the sentences around
    # it), and a sentence that leads into the next ("…only:") or says little alone brings
    # the next one.
    paragraph = [d for d in candidates if d.passage is top.passage and d.unit == top.unit]
    for d in paragraph:
        if len(paragraph) <= _MAX_SENTENCES or abs(d.position - top.position) <= 1:
            add(d)
    for c in list(best):
        if _TABLE_ROW in c.sentence:
            # A table row is read with the table's head (its first row).
            head = next(
                (d for d in candidates if d.passage is c.passage and _TABLE_ROW in d.sentence),
                None,
            )
            if head is not None:
                add(head)
        elif _leads_on(c.sentence):
            nxt = next(
                (d for d in candidates if d.passage is c.passage and d.position == c.position + 1),
                None,
            )
            if nxt is not None:
                add(nxt)
    best.sort(key=lambda c: (c.rank, c.position))
    groups: list[tuple[Passage, list[str]]] = []
    for c in best:
        if groups and groups[-1][0] is c.passage:
            groups[-1][1].append(c.sentence)
        else:
            groups.append((c.passage, [c.sentence]))
    parts = []
    for p, sentences in groups:
        text = _join(sentences)
        parts.append(f"{text}{' ' if text[-1].isascii() else ''}[{p.n}]")
    return _join(parts, items=False)


def _leads_on(sentence: str) -> bool:
    """Whether a sentence leads into the next one: it ends with a colon, or is so short
    it says little alone (a table head, "Yes.")."""
    if sentence.endswith((":", "：")):
        return True
    cjk = sum(1 for ch in sentence if not ch.isascii())
    return len(sentence) < 25 if cjk * 2 < len(sentence) else len(sentence) < 12


_CHECK = (
    "I'd rather not guess on that one: let me check it with the team. If you'd like a person "
    'to help you now, just reply "human".',
    "这个问题我需要先核实一下。如需人工客服帮您处理，请回复“转人工”。",
)
_ID_KINDS = ("order_id", "tracking", "sku", "code")


def knowledge_reply(
    body: dict[str, Any], question: str, functions: Sequence[dict[str, Any]]
) -> str | PlannedCall | None:
    """The simulator's reply from the shop's documents: a text, a `search_knowledge` call,
    or None when the documents have no say (no documents in the request, or a lookup the
    tools answer: an id in the question, or a question about the shopper's own order)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if not messages:
        return None
    docs = read_documents(messages)
    if not docs.present and not docs.searched:
        return None
    # A specialist told to answer one part of the message reads the documents for that part.
    question, _ = own_part(_system(messages), question)
    check = _CHECK[1] if mostly_chinese(question) else _CHECK[0]
    if messages[-1].get("role") == "tool":
        if not _ends_with_search(messages):
            return None
        return answer(question, docs.passages) or docs.no_knowledge_text or check
    if messages[-1].get("role") != "user":
        return None
    if _has_ids(question) and not (_codes_only(question) and _STACKING_RE.search(question.lower())):
        return None  # an order, a parcel, a product or a coupon to look up
    if _OWN_STATUS_RE.search(question.lower()):
        return None  # where the shopper's own order or refund is: the order tools say
    rules = asks_about_rules(question)
    lookup = choose(
        [f for f in functions if f.get("name") != SEARCH_KNOWLEDGE],
        question,
        tool_choice=body.get("tool_choice"),
    )
    if lookup.calls and _LIVE_DATA_RE.search(question.lower()) and not rules:
        return None  # stock, prices, current promotions: the catalogue's tools say
    found = answer(question, docs.passages) if docs.passages else None
    if found is not None:
        return found
    if lookup.calls:
        return None  # the documents don't say; a tool may (the catalogue, the promotions)
    # Found for the whole message, not for this part of it (or nothing useful): a model
    # searches for its own part once, then says it will check.
    offered = any(f.get("name") == SEARCH_KNOWLEDGE for f in functions)
    has_part = bool(PART_RE.search(_system(messages)))
    if offered and not docs.searched and (rules or docs.passages) and (has_part or docs.passages):
        return PlannedCall(SEARCH_KNOWLEDGE, {"query": " ".join(question.split())})
    if rules:
        return docs.no_knowledge_text or check
    return None


def _codes_only(question: str) -> bool:
    """Whether the only ids the question names are coupon codes (whether two codes go
    together is a rule of the shop, not a lookup)."""
    return not any(strong_values(kind, question) for kind in _ID_KINDS if kind != "code")


def _has_ids(question: str) -> bool:
    """Whether the question names something to look up: an order, a parcel, a product or a
    coupon code (codes carry a digit: "the coupon back" names none)."""
    for kind in _ID_KINDS:
        values = strong_values(kind, question)
        if kind == "code":
            values = [v for v in values if any(ch.isdigit() for ch in v)]
        if values:
            return True
    return False


def _system(messages: Sequence[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "system"), "")


def _ends_with_search(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether the tool results the request ends with include a `search_knowledge` one."""
    ids = set()
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        ids.add(str(m.get("tool_call_id")))
    return any(
        str(c.get("id")) in ids and (c.get("function") or {}).get("name") == SEARCH_KNOWLEDGE
        for m in messages
        for c in m.get("tool_calls") or []
        if isinstance(c, dict)
    )
