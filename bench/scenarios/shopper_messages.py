"""Shopper messages for the orchestration benchmark, in English and Chinese.

Every message names things that exist in the demo shop's data (bot/demo_shop/data.json):
order ids, tracking numbers, products, sizes and coupon codes, read from that file at start,
so the specialists' tools find what they look up and the whole tool loop runs. A template
belongs to the traffic category it is drawn for (logistics, refund, product, discount); a
few ask two things at once (several specialists) and a few are plain policy questions the
FAQ answers without a model.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.service_code import REPO_ROOT

SHOP_DATA = REPO_ROOT / "bot" / "demo_shop" / "data.json"
# The traffic mix.
DEFAULT_MIX: dict[str, float] = {
    "logistics": 0.35,
    "refund": 0.25,
    "product": 0.25,
    "discount": 0.15,
}

# Slots: {order} any order; {tracked} an order with a parcel and {tracking} its number;
# {delivered} a delivered order with {item}/{item_zh} one of its products; {unpaid} an order
# not shipped yet; {product}/{product_zh} a product, {size} one of its sizes when it has
# them; {coupon} a coupon code (valid, expired or used ones all exist). Each template is
# (language, text); a template may use {order} etc. and ask about a second topic.
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "logistics": (
        ("en", "Where is my order {tracked}? It's been a few days."),
        ("en", "When will {tracked} arrive? I need it before the weekend."),
        ("en", "Tracking {tracking} hasn't updated since yesterday, where is my parcel?"),
        ("en", "Can you check the parcel {tracking} for me? Which courier has it?"),
        ("en", "Has order {unpaid} shipped yet? I paid two days ago."),
        ("en", "Hi, my package for {tracked} says in transit. What's the estimated delivery?"),
        ("en", "Which courier is delivering {tracked} and what's the tracking number?"),
        ("en", "How much is shipping to Hangzhou?"),
        ("en", "Where is {tracked}? Also, is coupon {coupon} still valid for my next order?"),
        ("zh", "我的订单{tracked}到哪了？"),
        ("zh", "订单{tracked}什么时候能到？这周末要用"),
        ("zh", "帮我查下物流 {tracking}，好几天没更新了"),
        ("zh", "运单号{tracking}现在到哪里了？"),
        ("zh", "{unpaid}这个单什么时候发货呀"),
        ("zh", "请问订单{tracked}用的哪家快递？快递单号发我一下"),
        ("zh", "运费怎么算？"),
        ("zh", "订单{tracked}到哪了？另外{product_zh}还有货吗"),
    ),
    "refund": (
        ("en", "I'd like to return the {item} from order {delivered}, it's not what I expected."),
        ("en", "The {item} in {delivered} stopped working after two days. Can I get a refund?"),
        ("en", "I received {delivered} but the {item} is damaged. What should I do?"),
        ("en", "What's the status of my refund for {order}?"),
        ("en", "Can I exchange the {item} from {delivered} for a new one? It has a scratch."),
        ("en", "Please refund order {unpaid}, I changed my mind."),
        ("en", "What is your return policy?"),
        (
            "en",
            "The {item} from {delivered} is faulty. I want a refund, and do you have a "
            "discount code for the trouble?",
        ),
        ("zh", "订单{delivered}里的{item_zh}想退货，和描述的不一样"),
        ("zh", "{delivered}的{item_zh}收到就坏了，能退款吗？"),
        ("zh", "我要退款，订单号{unpaid}，不想要了"),
        ("zh", "{order}的退款到哪一步了？"),
        ("zh", "订单{delivered}的{item_zh}能换货吗？"),
        ("zh", "几天内可以退货？"),
        ("zh", "订单{delivered}的{item_zh}有质量问题想退货，顺便问下优惠券{coupon}还能用吗"),
    ),
    "product": (
        ("en", "Is the {product} in stock?"),
        ("en", "Do you have the {product} in size {size}?"),
        ("en", "What's the warranty on the {product}?"),
        ("en", "What colours does the {product} come in?"),
        ("en", "How much is the {product} right now?"),
        ("en", "Can you tell me the specs of the {product}?"),
        ("en", "Is the {product} available, and how long would delivery to Shanghai take?"),
        ("zh", "{product_zh}有货吗？"),
        ("zh", "{product_zh}有{size}码吗"),
        ("zh", "{product_zh}保修多久？"),
        ("zh", "{product_zh}有哪些颜色？"),
        ("zh", "{product_zh}现在多少钱？"),
        ("zh", "{product_zh}的参数是什么"),
        ("zh", "{product_zh}有货吗？能用优惠券{coupon}吗"),
    ),
    "discount": (
        ("en", "Is coupon {coupon} still valid?"),
        ("en", "Can I use the code {coupon} on my order?"),
        ("en", "What promotions do you have right now?"),
        ("en", "How much does {coupon} take off, and does it stack with the sale?"),
        ("en", "My code {coupon} doesn't work at checkout, why?"),
        ("zh", "优惠券{coupon}还能用吗？"),
        ("zh", "现在有什么优惠活动？"),
        ("zh", "优惠码{coupon}怎么用？能和满减叠加吗"),
        ("zh", "{coupon}这个券为什么用不了"),
        ("zh", "双11有什么活动？"),
    ),
}

_SLOT_RE = re.compile(r"\{(\w+)\}")
_SHIPPED = {"shipped", "in_transit", "delivered", "refund_requested", "refunded"}
_NOT_SHIPPED = {"pending_payment", "paid"}


@dataclass(frozen=True, slots=True)
class _Order:
    id: str
    status: str
    tracking: str | None
    items: tuple[tuple[str, str], ...]  # (name, name_zh)


@dataclass(frozen=True, slots=True)
class _Product:
    name: str
    name_zh: str
    category: str
    sizes: tuple[str, ...]


class ShopData:
    """The parts of the demo shop's data the messages name."""

    def __init__(self, path: Path = SHOP_DATA) -> None:
        data: dict[str, Any] = json.loads(path.read_text("utf-8"))
        self.orders = [
            _Order(
                str(o["id"]),
                str(o["status"]),
                o.get("tracking_number"),
                tuple((str(i["name"]), str(i.get("name_zh") or i["name"])) for i in o["items"]),
            )
            for o in data["orders"]
        ]
        self.products = [
            _Product(
                str(p["name"]),
                str(p.get("name_zh") or p["name"]),
                str(p.get("category", "")),
                tuple(str(s) for s in p.get("sizes") or ()),
            )
            for p in data["products"]
        ]
        self.coupons = [str(c["code"]) for c in data["coupons"]]
        self.tracked = [o for o in self.orders if o.tracking and o.status in _SHIPPED]
        self.delivered = [o for o in self.orders if o.status == "delivered"]
        self.unshipped = [o for o in self.orders if o.status in _NOT_SHIPPED]
        # Sizes a shopper asks for by number or letter ("size M", "42码"): clothes and shoes.
        self.sized = [p for p in self.products if p.category == "clothing" and len(p.sizes) > 1]
        if not (self.tracked and self.delivered and self.unshipped and self.sized):
            raise SystemExit(f"bench: {path} lacks the orders/products the messages need")


class ShopperMessages:
    """Draws a message: a category by the mix, a language, a template, its slots filled.

    `category_of[text]` remembers the category each generated text was drawn for.
    """

    def __init__(
        self,
        data: ShopData | None = None,
        mix: Mapping[str, float] = DEFAULT_MIX,
        zh_share: float = 0.5,
    ) -> None:
        unknown = set(mix) - set(TEMPLATES)
        if unknown:
            raise ValueError(f"no messages for {sorted(unknown)}; known: {sorted(TEMPLATES)}")
        self.data = data or ShopData()
        self.categories = [c for c in mix if mix[c] > 0]
        self.weights = [mix[c] for c in self.categories]
        self.zh_share = zh_share
        self.category_of: dict[str, str] = {}

    def __call__(self, rng: random.Random) -> str:
        category = rng.choices(self.categories, self.weights)[0]
        language = "zh" if rng.random() < self.zh_share else "en"
        pool = [t for lang, t in TEMPLATES[category] if lang == language]
        text = self.fill(rng.choice(pool), rng)
        self.category_of.setdefault(text, category)
        return text

    def fill(self, template: str, rng: random.Random) -> str:
        d = self.data
        names = set(_SLOT_RE.findall(template))
        values: dict[str, str] = {}
        if names & {"delivered", "item", "item_zh"}:
            order = rng.choice(d.delivered)
            item = rng.choice(order.items)
            values.update(delivered=order.id, item=item[0], item_zh=item[1])
        if names & {"tracked", "tracking"}:
            order = rng.choice(d.tracked)
            values.update(tracked=order.id, tracking=order.tracking or "")
        if "unpaid" in names:
            values["unpaid"] = rng.choice(d.unshipped).id
        if "order" in names:
            values["order"] = rng.choice(d.orders).id
        if names & {"product", "product_zh", "size"}:
            product = rng.choice(d.sized if "size" in names else d.products)
            values.update(product=product.name, product_zh=product.name_zh)
            if product.sizes:
                values["size"] = rng.choice(product.sizes)
        if "coupon" in names:
            values["coupon"] = rng.choice(d.coupons)
        return template.format(**values)


def every_template(messages: ShopperMessages, seed: int = 0) -> Sequence[tuple[str, str]]:
    """(category, one filled text) per template, for checking how the router sees them."""
    rng = random.Random(seed)
    return [
        (category, messages.fill(text, rng))
        for category, templates in TEMPLATES.items()
        for _, text in templates
    ]
