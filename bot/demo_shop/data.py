"""The demo shop's sample data: loaded once from data.json, dates made current, searchable.

Times in data.json are relative ("-3d 10:15" is 10:15 Beijing time three days before the
first load, "+20h" twenty hours after it), so orders are always "in transit now" and
coupons "valid until next month" whenever the demo runs.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

# China has had no daylight saving since 1991: a fixed offset is exact and needs no tzdata.
SHOP_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")

_RELATIVE_RE = re.compile(r"([+-])(\d+)([dhm])(?: (\d\d):(\d\d))?")
_WORD_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HAN_RUN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
# Characters that say nothing about a product; ignored when single characters are matched.
_HAN_STOP = set("的了吗呢吧啊么有没是在我你他她它们这那个和与或要想买请问多少钱什么怎样么还也都就")
_EN_STOP = {
    "a", "an", "and", "any", "are", "buy", "can", "do", "for", "have", "how", "i", "in",
    "is", "it", "me", "much", "my", "of", "on", "or", "price", "the", "to", "want", "what",
    "with", "you", "your",
}  # fmt: skip


@dataclass(frozen=True)
class ShopData:
    """Immutable after loading; handlers copy what they change."""

    loaded_at: datetime
    products: dict[str, dict[str, Any]]
    orders: dict[str, dict[str, Any]]
    tracking: dict[str, dict[str, Any]]
    coupons: dict[str, dict[str, Any]]
    promotions: list[dict[str, Any]]
    parcel_owner: dict[str, str]  # tracking number -> the shop user whose order it carries

    def search_products(self, query: str, category: str | None = None) -> list[dict[str, Any]]:
        """Products whose English/Chinese names, categories or keywords match `query`, best first.

        English matches whole words (a trailing plural "s" ignored); Chinese matches character
        pairs, which needs no word segmenter ("蓝牙耳机" finds "无线降噪蓝牙耳机"), and single
        characters only when no pair matched anything.
        """
        pool = [p for p in self.products.values() if category is None or p["category"] == category]
        query = query.strip().lower()
        if not query:
            return pool
        words = {_singular(w) for w in _WORD_RE.findall(query)} - _EN_STOP
        runs = _HAN_RUN_RE.findall(query)
        pairs = {run[i : i + 2] for run in runs for i in range(len(run) - 1)}
        singles = {c for run in runs for c in run} - _HAN_STOP

        def score(p: dict[str, Any], use_singles: bool) -> int:
            haystack_words = p["_words"]
            zh = p["_zh"]
            points = 2 * sum(1 for w in words if w in haystack_words)
            points += 2 * sum(1 for pair in pairs if pair in zh)
            if use_singles:
                points += sum(1 for c in singles if c in zh)
            return points

        scored = [(score(p, False), p) for p in pool]
        if not any(s for s, _ in scored) and singles:
            scored = [(score(p, True), p) for p in pool]
        ranked = sorted((x for x in scored if x[0] > 0), key=lambda x: (-x[0], x[1]["sku"]))
        return [p for _, p in ranked]


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def materialize(value: Any, now: datetime) -> Any:
    """Turn every relative time string in `value` into an ISO 8601 timestamp."""
    if isinstance(value, dict):
        return {k: materialize(v, now) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, now) for v in value]
    if isinstance(value, str):
        match = _RELATIVE_RE.fullmatch(value)
        if match:
            return _resolve(match, now).isoformat()
    return value


def _resolve(match: re.Match[str], now: datetime) -> datetime:
    sign = -1 if match.group(1) == "-" else 1
    amount = int(match.group(2)) * sign
    unit = match.group(3)
    if unit == "h":
        return (now + timedelta(hours=amount)).replace(second=0, microsecond=0)
    if unit == "m":
        return (now + timedelta(minutes=amount)).replace(second=0, microsecond=0)
    day = now + timedelta(days=amount)
    hour, minute = int(match.group(4) or 0), int(match.group(5) or 0)
    return day.replace(hour=hour, minute=minute, second=0, microsecond=0)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def build(raw: dict[str, Any], now: datetime) -> ShopData:
    data = materialize(raw, now)
    products: dict[str, dict[str, Any]] = {}
    for p in data["products"]:
        text = " ".join([p["name"], p["category"], *p["tags"]]).lower()
        p["_words"] = {_singular(w) for w in _WORD_RE.findall(text)}
        p["_zh"] = " ".join([p["name_zh"], _CATEGORY_ZH[p["category"]], *p["tags_zh"]])
        products[p["sku"]] = p
    return ShopData(
        loaded_at=now,
        products=products,
        orders={o["id"]: o for o in data["orders"]},
        tracking={t["tracking_number"]: t for t in data["tracking"]},
        coupons={c["code"]: c for c in data["coupons"]},
        promotions=list(data["promotions"]),
        parcel_owner={
            o["tracking_number"]: o["customer_id"]
            for o in data["orders"]
            if o.get("tracking_number")
        },
    )


_CATEGORY_ZH = {"electronics": "数码电子 电器", "clothing": "服装 服饰 衣服", "home": "家居 家电"}
CATEGORY_NAMES_ZH = {"electronics": "数码电子", "clothing": "服装", "home": "家居"}


@functools.cache
def load() -> ShopData:
    """The sample data, read and dated once per process."""
    text = resources.files("bot.demo_shop").joinpath("data.json").read_text(encoding="utf-8")
    return build(json.loads(text), datetime.now(SHOP_TZ))


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A deep copy without the search index fields (names starting with '_')."""
    return {k: copy.deepcopy(v) for k, v in record.items() if not k.startswith("_")}
