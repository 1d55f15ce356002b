"""How the simulator chooses an OpenAI function tool for a shopper's message.

Each offered tool is scored against the text: a required parameter that can be filled from
a specific value in the text (an order id, a tracking number, a coupon code, a SKU) is strong
evidence; free-text parameters (a search query, a refund reason) can always be filled, so a
tool that needs only those must also be about what the shopper talks about (its name and
description share a topic with the text: orders, parcels, refunds, products, coupons,
promotions). The best tool is called; further tools are called in parallel only for values
no earlier call used (two order ids: two lookups).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from simulator.keywords import keyword_pattern

# Topics, with the words that name them (English ones match whole words).
_TOPICS: dict[str, tuple[str, ...]] = {
    "order": ("order", "orders", "purchase", "订单", "下单", "单号", "注文", "đơn hàng"),
    "logistics": (
        "where is", "where's", "track", "tracking", "parcel", "package", "shipping", "shipped",
        "delivery", "delivered", "deliver", "courier", "arrive", "arrival", "eta", "logistics",
        "快递", "物流", "包裹", "到哪", "发货", "配送", "派送", "签收", "运单", "到货", "几时到",
        "什么时候到", "配達", "荷物", "giao hàng",
    ),
    "refund": (
        "refund", "refunds", "return", "money back", "reimburse", "退款", "退货", "退钱", "退换",
        "返品", "返金", "hoàn tiền",
    ),
    "product": (
        "product", "products", "item", "items", "stock", "available", "price", "cost",
        "how much", "size", "sizes", "colour", "colours", "color", "colors", "spec", "specs",
        "specifications", "warranty", "buy", "sell", "catalogue", "catalog", "recommend",
        "search", "商品", "产品", "有货", "库存", "价格", "多少钱", "尺码", "尺寸", "颜色", "规格",
        "参数", "保修", "质保", "推荐", "有没有", "想买", "在庫", "サイズ",
    ),
    "coupon": (
        "coupon", "coupons", "promo code", "voucher", "discount code", "code", "优惠券", "优惠码",
        "券", "折扣码", "クーポン", "mã giảm giá",
    ),
    "promotion": (
        "promotion", "promotions", "promo", "sale", "sales", "deal", "deals", "offer", "offers",
        "discount", "discounts", "double 11", "618", "pre-sale", "presale", "活动", "促销",
        "优惠", "打折", "折扣", "满减", "双11", "双十一", "预售", "秒杀", "包邮", "セール",
        "khuyến mãi",
    ),
}  # fmt: skip

# ASCII look-arounds instead of \b: in "订单ORD-1001" the id touches a CJK word character.
_ORDER_ID_RE = re.compile(r"(?<![A-Za-z0-9])ORD-?\s?(\d{3,8})(?![0-9])", re.IGNORECASE)
_BARE_ORDER_RE = re.compile(
    r"(?:order|订单|单号)\s*(?:no\.?|number|id)?\s*[#:：]?\s*(?<![A-Za-z0-9-])(\d{4,8})(?![0-9])",
    re.IGNORECASE,
)
_PREFIX_EXAMPLE_RE = re.compile(r"\b([A-Z]{2,5}-)\d{3,}")
_TRACKING_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:SF|YT|JDV?|JT|YD|STO|ZTO|EMS|DPK)\d{9,15}|7\d{13})(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SKU_RE = re.compile(r"(?<![A-Za-z0-9-])(?!ORD-)[A-Z]{2,3}-\d{3,5}(?![A-Za-z0-9])", re.IGNORECASE)
_CODE_RE = re.compile(r"(?<![A-Za-z0-9-])[A-Z]{2,}[A-Z0-9]*\d[A-Z0-9]*(?![A-Za-z0-9-])")
_CODE_AFTER_RE = re.compile(
    r"(?:coupon|code|voucher|优惠券|优惠码|券码|折扣码)\s*[:：]?\s*"
    r"([A-Za-z][A-Za-z0-9]{2,19})(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
_HAN_RUN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_REASON_RE = re.compile(
    r"(?:(?<![a-z])(?:because|since|as|reason(?: is)?:?|due to)(?![a-z])|因为|由于|原因是?[:：]?)"
    r"\s*(.+)",
    re.IGNORECASE | re.DOTALL,
)

# Words that are not what a shopper searches for (questions, shopping verbs, topic words).
_QUERY_STOP = {
    "a", "about", "an", "and", "any", "anything", "are", "available", "best", "buy", "can",
    "cheap", "colour", "colours", "color", "colors", "cost", "costs", "could", "do", "does",
    "find", "for", "get", "good", "have", "hello", "hey", "hi", "how", "i", "i'd", "i'm",
    "in", "is", "it", "item", "items", "know", "like", "looking", "many", "me", "much", "my",
    "need", "of", "on", "one", "or", "please", "price", "prices", "product", "products",
    "recommend", "sell", "show", "size", "sizes", "some", "spec", "specs", "still", "stock",
    "tell", "thanks", "that", "the", "there", "these", "this", "those", "to", "want",
    "warranty", "what", "what's", "which", "with", "would", "you", "your", "search",
    "come", "comes", "fit", "fits", "work", "works", "right", "now", "new", "all", "they",
    "them", "it's", "left", "got", "check", "at", "be", "if", "we",
}  # fmt: skip
_QUERY_STOP_ZH = (
    "请问", "你们", "你家", "店里", "有没有", "没有", "多少钱", "价格", "怎么样", "我想买", "想买",
    "我要", "我想", "一下", "一个", "一款", "这款", "那款", "这个", "那个", "什么", "还有",
    "库存", "现货", "有货", "尺码", "颜色", "推荐", "卖", "吗", "呢", "吧", "啊", "的", "有",
    "买", "查", "找", "看看", "规格", "参数", "保修", "质保",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PlannedCall:
    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


@dataclass
class _Fit:
    name: str
    order: int
    score: int
    arguments: dict[str, Any]
    strong: dict[str, list[str]] = field(default_factory=dict)  # param -> all values found
    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (param, kind, desc)


_TOPIC_RES = {topic: keyword_pattern(words) for topic, words in _TOPICS.items()}


def topics(text: str) -> set[str]:
    lowered = text.lower()
    return {t for t, pattern in _TOPIC_RES.items() if pattern.search(lowered)}


def _tool_topics(tool: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(topics of the tool's name, topics of its description)."""
    return _topics_of(str(tool.get("name", "")), str(tool.get("description", "")))


@functools.lru_cache(maxsize=1024)
def _topics_of(name: str, description: str) -> tuple[frozenset[str], frozenset[str]]:
    # The same few tools come with every request: scanning their texts once is enough.
    return frozenset(topics(name.replace("_", " "))), frozenset(topics(description))


def tool_function(item: Any) -> dict[str, Any] | None:
    """The `function` object of one entry of an OpenAI `tools` array, or None if malformed."""
    if not isinstance(item, dict) or item.get("type", "function") != "function":
        return None
    fn = item.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return None
    return fn


# --- filling parameters from the text ---------------------------------------------------------


def _kind(param: str, spec: dict[str, Any]) -> str:
    """What sort of value a parameter wants, from its name first, then its description."""
    name = param.lower()
    desc = str(spec.get("description", "")).lower()
    by_name: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("tracking", ("tracking", "waybill", "运单")),
        ("order_id", ("order",)),
        ("sku", ("sku",)),
        ("code", ("coupon", "code", "voucher", "promo")),
        ("reason", ("reason", "why", "comment", "note", "message", "description")),
        ("query", ("query", "keyword", "search", "product", "q")),
    )
    for kind, hints in by_name:
        if any(h == name or h in name.split("_") for h in hints):
            return kind
    by_description: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("tracking", ("tracking number", "waybill")),
        ("order_id", ("order id", "order number")),
        ("sku", ("sku",)),
        ("code", ("coupon", "promo code", "voucher")),
        ("reason", ("reason", "why")),
        ("query", ("keyword", "search", "product")),
    )
    for kind, hints in by_description:
        if any(h in desc for h in hints):
            return kind
    return "unknown"


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def strong_values(kind: str, text: str, description: str = "") -> list[str]:
    """Specific values of one kind in the text, in order, without repeats.

    An order number typed without its prefix ("order #1001") gets the prefix of the
    example in the parameter's description ("like ORD-1001").
    """
    if kind == "order_id":
        hits = [(m.start(), f"ORD-{m.group(1)}") for m in _ORDER_ID_RE.finditer(text)]
        example = _PREFIX_EXAMPLE_RE.search(description)
        prefix = example.group(1) if example else ""
        hits += [(m.start(), prefix + m.group(1)) for m in _BARE_ORDER_RE.finditer(text)]
        return _unique([value for _, value in sorted(hits)])
    if kind == "tracking":
        return _unique([m.group().upper() for m in _TRACKING_RE.finditer(text)])
    if kind == "sku":
        return _unique([m.group().upper() for m in _SKU_RE.finditer(text)])
    if kind == "code":
        taken = {m.group().upper() for m in _TRACKING_RE.finditer(text)}
        found = [m.group(1).upper() for m in _CODE_AFTER_RE.finditer(text)]
        found += [m.group() for m in _CODE_RE.finditer(text)]
        return _unique([c for c in found if c not in taken and not c.startswith("ORD")])
    return []


def product_query(text: str) -> str:
    """The product words of a message: 'do you have wireless earbuds?' -> 'wireless earbuds'."""
    cleaned = _strip_ids(text)
    words = [w for w in _WORD_RE.findall(cleaned) if w.lower() not in _QUERY_STOP and len(w) > 1]
    han_parts: list[str] = []
    for run in _HAN_RUN_RE.findall(cleaned):
        for stop in _QUERY_STOP_ZH:
            run = run.replace(stop, " ")
        han_parts.extend(part for part in run.split() if len(part) > 1)
    return " ".join(words[:4] + han_parts[:2]).strip()


def refund_reason(text: str) -> str:
    """Why the shopper wants a refund, in their words (the clause after 'because', or all)."""
    cleaned = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(_strip_ids(text).split()))
    match = _REASON_RE.search(cleaned)
    reason = match.group(1) if match else cleaned
    reason = reason.strip(" ,.;:!?，。；：！？")
    return reason[:200] if reason else ""


def _strip_ids(text: str) -> str:
    for pattern in (_ORDER_ID_RE, _TRACKING_RE, _SKU_RE, _CODE_RE):
        text = pattern.sub(" ", text)
    return text


def _fit(tool: dict[str, Any], order: int, text: str, text_topics: set[str]) -> _Fit:
    params = tool.get("parameters")
    params = params if isinstance(params, dict) else {}
    props = params.get("properties")
    props = props if isinstance(props, dict) else {}
    required = [r for r in params.get("required", []) if isinstance(r, str)]
    name_topics, desc_topics = _tool_topics(tool)
    # The name says what a tool is for; its description also lists what it returns (an
    # order's "refund_requested" status), so that only breaks ties.
    desc_hits = len((desc_topics - name_topics) & text_topics)
    topic_score = 3 * len(name_topics & text_topics) + min(1, desc_hits)
    fit = _Fit(str(tool["name"]), order, topic_score, {})
    needs_topic = not required
    for param in required:
        spec = props.get(param)
        spec = spec if isinstance(spec, dict) else {}
        kind = _kind(param, spec)
        values = strong_values(kind, text, str(spec.get("description", "")))
        enum = spec.get("enum")
        if isinstance(enum, list):
            values = [str(v) for v in enum if str(v).lower() in text.lower()]
        if values:
            fit.arguments[param] = values[0]
            fit.strong[param] = values
            fit.score += 3
            continue
        weak = (
            product_query(text)
            if kind == "query"
            else refund_reason(text)
            if kind == "reason"
            else ""
        )
        if weak:
            fit.arguments[param] = weak
            needs_topic = True
        else:
            fit.missing.append((param, kind, str(spec.get("description", param))))
    if needs_topic and not fit.missing and not name_topics & text_topics:
        # Free text fits anything, so the tool's name must be about what the shopper asks;
        # a tool without parameters may instead share several topics through its description.
        if required or desc_hits < 2:
            fit.missing.append(("", "topic", ""))
    return fit


def _forced_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
    return None


@dataclass(frozen=True, slots=True)
class ToolDecision:
    """Calls to make; or, when none fits, what a tool would need (to ask the shopper)."""

    calls: list[PlannedCall]
    # (kind, description) of the ids the likeliest tools lack, e.g. ("order_id", "The order
    # id, like ORD-1001."): what to ask the shopper for.
    wanted: list[tuple[str, str]]


def choose(
    tools: list[dict[str, Any]],
    text: str,
    *,
    tool_choice: Any = None,
    parallel: bool = True,
) -> ToolDecision:
    """The tool calls a model would make for `text`; `tools` are `function` objects."""
    if tool_choice == "none" or not tools:
        return ToolDecision([], [])
    text_topics = topics(text)
    fits = [_fit(tool, i, text, text_topics) for i, tool in enumerate(tools)]
    forced = _forced_name(tool_choice)
    if forced is not None:
        chosen = [f for f in fits if f.name == forced]
        if chosen:
            return ToolDecision([PlannedCall(forced, _best_effort(chosen[0]))], [])
    ready = sorted((f for f in fits if not f.missing), key=lambda f: (-f.score, f.order))
    if not ready:
        if tool_choice == "required":
            best = min(fits, key=lambda f: (-f.score, f.order))
            return ToolDecision([PlannedCall(best.name, _best_effort(best))], [])
        about = [f for f in fits if f.score > 0 and f.missing and f.missing[0][0]]
        about.sort(key=lambda f: (-f.score, f.order))
        wanted: dict[str, str] = {}
        for f in about:
            for param, kind, desc in f.missing:
                if param and kind not in ("query", "reason", "unknown"):
                    wanted.setdefault(kind, desc)
        preference = ("order_id", "tracking", "sku", "code")
        ranked = sorted(wanted.items(), key=lambda kv: preference.index(kv[0]))
        return ToolDecision([], ranked[:2])

    calls: list[PlannedCall] = []
    used: set[str] = set()
    for fit in ready:
        values = {v for vs in fit.strong.values() for v in vs}
        if calls and (not fit.strong or values <= used):
            continue  # nothing new for this tool to look up
        calls.extend(_expand(fit, used))
        used |= values
        if not parallel:
            break
    if not parallel:
        calls = calls[:1]
    return ToolDecision(calls[:4], [])


def _expand(fit: _Fit, used: set[str]) -> list[PlannedCall]:
    """One call per value of a tool's single id parameter ('ORD-1001 and ORD-1002')."""
    if len(fit.strong) != 1:
        return [PlannedCall(fit.name, dict(fit.arguments))]
    ((param, values),) = fit.strong.items()
    fresh = [v for v in values if v not in used] or values[:1]
    return [PlannedCall(fit.name, {**fit.arguments, param: v}) for v in fresh]


def _best_effort(fit: _Fit) -> dict[str, Any]:
    args = dict(fit.arguments)
    for param, _, _ in fit.missing:
        if param:
            args[param] = ""
    return args
