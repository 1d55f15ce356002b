"""What the simulator says after its tool calls ran: a short customer-service answer.

It reads the tool results (JSON from the shop's backend) the way a model would, picks the
facts a shopper asked about (order status, courier and ETA, the latest tracking event, price
and stock, whether a coupon is valid and what it takes off, the next steps of a refund) and
writes them in Chinese when the shopper wrote mostly Chinese, else in English. The shapes it
knows are the demo shop's; anything else is summarised field by field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from orchestration.language import mostly_chinese

_ORDER_STATUS = {
    "pending_payment": ("awaiting payment", "待付款"),
    "paid": ("paid and being prepared for shipping", "已付款，正在备货"),
    "shipped": ("shipped: the courier has picked it up", "已发货，快递已揽收"),
    "in_transit": ("in transit", "运输中"),
    "delivered": ("delivered", "已签收"),
    "cancelled": ("cancelled", "已取消"),
    "refund_requested": ("waiting for its refund to be processed", "退款处理中"),
    "refunded": ("refunded", "已退款"),
}
_PARCEL_STATUS = {
    "picked_up": ("picked up by the courier", "已揽收"),
    "in_transit": ("in transit", "运输中"),
    "out_for_delivery": ("out for delivery", "派送中"),
    "delivered": ("delivered", "已签收"),
}
_COUPON_STATUS = {
    "valid": ("valid", "可以使用"),
    "expired": ("expired", "已过期"),
    "used": ("used", "已使用"),
}
_CLOSING = ("Is there anything else I can help with?", "请问还有什么可以帮您的吗？")


# --- small formatters ---------------------------------------------------------------------


def _money(value: Any, zh: bool) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    return f"{value:.2f}元" if zh else f"¥{value:.2f}"


def _when(value: Any, zh: bool, *, with_time: bool = False) -> str:
    if not isinstance(value, str):
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    other_year = moment.year != datetime.now(moment.tzinfo).year
    if zh:
        day = f"{moment.year}年" if other_year else ""
        day += f"{moment.month}月{moment.day}日"
        return f"{day} {moment:%H:%M}" if with_time else day
    day = f"{moment.day} {moment:%b}" + (f" {moment.year}" if other_year else "")
    return f"{day} {moment:%H:%M}" if with_time else day


def _pick(record: dict[str, Any], key: str, zh: bool) -> Any:
    """`key_zh` for a Chinese answer when the record has it, else `key`."""
    if zh and record.get(f"{key}_zh"):
        return record[f"{key}_zh"]
    return record.get(key)


def _label(table: dict[str, tuple[str, str]], value: Any, zh: bool) -> str:
    pair = table.get(str(value))
    if pair is None:
        return str(value).replace("_", " ")
    return pair[1] if zh else pair[0]


def _join(parts: list[str], zh: bool) -> str:
    parts = [p for p in parts if p]
    if zh:
        return "、".join(parts)
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# --- one paragraph per kind of result ---------------------------------------------------------


def _order(o: dict[str, Any], zh: bool) -> str:
    oid = o.get("id", "")
    status = o.get("status")
    items = [
        f"{_pick(i, 'name', zh)} ×{i.get('qty', 1)}"
        for i in o.get("items") or []
        if isinstance(i, dict)
    ]
    total = _money(o.get("total"), zh)
    courier = _pick(o, "courier", zh)
    tracking = o.get("tracking_number")
    eta = _when(o.get("estimated_delivery"), zh)
    raw_refund = o.get("refund")
    refund: dict[str, Any] = raw_refund if isinstance(raw_refund, dict) else {}
    if zh:
        text = f"您的订单{oid}目前{_label(_ORDER_STATUS, status, True)}"
        if courier and tracking:
            text += f"，由{courier}配送（运单号{tracking}）"
        if status in ("paid", "shipped", "in_transit") and eta:
            text += f"，预计{eta}送达"
        if status == "delivered" and o.get("delivered_at"):
            text += f"，已于{_when(o.get('delivered_at'), True)}签收"
        if status == "pending_payment":
            pay_before = _when((o.get("payment") or {}).get("pay_before"), True, with_time=True)
            text += f"，请在{pay_before}前完成付款，超时订单会自动关闭" if pay_before else ""
        if refund.get("id"):
            text += f"，退款单号{refund['id']}"
        text += "。"
        if items:
            text += f"订单包含：{_join(items, True)}，合计{total}。"
        return text
    if status == "delivered":
        text = f"Your order {oid} was delivered"
        if o.get("delivered_at"):
            text += f" on {_when(o.get('delivered_at'), False)}"
        if courier and tracking:
            text += f" by {courier} (tracking number {tracking})"
        return text + (f". It contained {_join(items, False)}, {total} in total." if items else ".")
    text = f"Your order {oid} is {_label(_ORDER_STATUS, status, False)}"
    if courier and tracking:
        text += f" with {courier} (tracking number {tracking})"
    if status in ("paid", "shipped", "in_transit") and eta:
        text += f" and should arrive on {eta}"
    if status == "pending_payment":
        pay_before = _when((o.get("payment") or {}).get("pay_before"), False, with_time=True)
        if pay_before:
            text += f"; please pay before {pay_before}, or it will be closed automatically"
    if refund.get("id"):
        text += f" (refund request {refund['id']})"
    text += "."
    if items:
        text += f" It contains {_join(items, False)}, {total} in total."
    return text


def _parcel(p: dict[str, Any], zh: bool) -> str:
    number = p.get("tracking_number", "")
    courier = _pick(p, "courier", zh) or ""
    status = _label(_PARCEL_STATUS, p.get("status"), zh)
    events = [e for e in p.get("events") or [] if isinstance(e, dict)]
    latest = max(events, key=lambda e: str(e.get("time", "")), default=None)
    eta = _when(p.get("eta"), zh)
    if zh:
        text = f"您的包裹{number}（{courier}）目前{status}。"
        if latest:
            where = _pick(latest, "location", True) or ""
            what = _pick(latest, "description", True) or ""
            text += f"最新动态：{_when(latest.get('time'), True, with_time=True)} {where}，{what}。"
        if eta and p.get("status") != "delivered":
            text += f"预计{eta}送达。"
        return text
    text = f"Your parcel {number} with {courier} is {status}."
    if latest:
        where = latest.get("location") or ""
        what = latest.get("description") or ""
        at = _when(latest.get("time"), False, with_time=True)
        text += f" Latest update, {at} in {where}: {what}."
    if eta and p.get("status") != "delivered":
        text += f" It should arrive on {eta}."
    return text


def _stock(p: dict[str, Any], zh: bool) -> str:
    stock = p.get("stock")
    if not isinstance(stock, int):
        return ""
    if stock <= 0:
        return "目前缺货" if zh else "currently out of stock"
    if stock <= 5:
        return f"仅剩{stock}件" if zh else f"only {stock} left"
    return f"有现货（{stock}件）" if zh else f"in stock ({stock} available)"


def _product(p: dict[str, Any], zh: bool) -> str:
    name = _pick(p, "name", zh)
    sku = p.get("sku", "")
    price = _money(p.get("price"), zh)
    colours = [
        str(_pick(c, "name", zh)) if isinstance(c, dict) else str(c) for c in p.get("colours") or []
    ]
    sizes = [str(s) for s in p.get("sizes") or []]
    warranty = p.get("warranty")
    warranty_text = _pick(warranty, "description", zh) if isinstance(warranty, dict) else warranty
    if zh:
        text = f"{name}（{sku}）售价{price}，{_stock(p, True)}。"
        if colours:
            text += f"颜色：{_join(colours, True)}。"
        if sizes:
            text += f"尺码：{_join(sizes, True)}。"
        if warranty_text:
            text += f"售后：{warranty_text}。"
        return text
    text = f"{name} ({sku}) costs {price} and is {_stock(p, False)}."
    if colours:
        text += f" Colours: {_join(colours, False)}."
    if sizes:
        text += f" Sizes: {_join(sizes, False)}."
    if warranty_text:
        text += f" Warranty: {warranty_text}."
    return text


def _search(result: dict[str, Any], zh: bool) -> str:
    products = [p for p in result.get("products") or [] if isinstance(p, dict)]
    query = result.get("query") or ""
    if not products:
        if zh:
            return f"抱歉，没有找到与“{query}”相关的商品，可以换个说法再试试。"
        return (
            f"Sorry, I couldn't find any product matching “{query}”. "
            "Could you describe it differently?"
        )
    shown = []
    for p in products[:3]:
        name, sku, price = _pick(p, "name", zh), p.get("sku", ""), _money(p.get("price"), zh)
        stock = _stock(p, zh)
        shown.append(
            f"{name}（{sku}，{price}，{stock}）" if zh else f"{name} ({sku}, {price}, {stock})"
        )
    count = result.get("count", len(products))
    if zh:
        return f"为您找到{count}件相关商品：{'；'.join(shown)}。"
    noun = "product" if count == 1 else "products"
    return f"I found {count} matching {noun}: {'; '.join(shown)}."


def _discount(c: dict[str, Any], zh: bool) -> str:
    d = c.get("discount")
    if not isinstance(d, dict):
        return ""
    if d.get("type") == "percent":
        percent = d.get("percent", 0)
        cap = d.get("max_amount")
        if zh:
            rate = (100 - float(percent)) / 10
            text = f"{rate:g}折"
            return text + (f"（最高减{_money(cap, True)}）" if cap else "")
        return f"{percent}% off" + (f" (up to {_money(cap, False)})" if cap else "")
    amount = d.get("amount")
    return f"减{_money(amount, True)}" if zh else f"{_money(amount, False)} off"


def _coupon(c: dict[str, Any], zh: bool) -> str:
    code = c.get("code", "")
    status = c.get("status")
    until = _when(c.get("valid_until"), zh)
    minimum = c.get("min_spend") or 0
    stackable = c.get("stackable")
    if zh:
        if status == "expired":
            return f"抱歉，优惠券{code}已于{until}过期，暂时不能使用了。"
        if status == "used":
            return f"优惠券{code}已经使用过了，每张券只能用一次。"
        text = f"优惠券{code}{_label(_COUPON_STATUS, status, True)}，有效期至{until}："
        if c.get("description_zh"):
            text += str(c["description_zh"])
        else:
            text += (f"满{_money(minimum, True)}" if minimum else "无门槛") + _discount(c, True)
        text += "。" + ("可与店铺活动叠加使用。" if stackable else "不可与其他优惠叠加。")
        return text
    if status == "expired":
        return f"Sorry, coupon {code} expired on {until}, so it can no longer be used."
    if status == "used":
        return f"Coupon {code} has already been used; each coupon works once."
    text = f"Coupon {code} is {_label(_COUPON_STATUS, status, False)} until {until}: "
    text += _discount(c, False)
    text += (
        f" on orders of {_money(minimum, False)} or more." if minimum else " with no minimum spend."
    )
    text += (
        " It can be combined with the store's promotions."
        if stackable
        else " It can't be combined with other offers."
    )
    return text


def _promotions(result: dict[str, Any], zh: bool) -> str:
    promos = [p for p in result.get("promotions") or [] if isinstance(p, dict)]
    if not promos:
        return "目前没有进行中的活动。" if zh else "There are no promotions running right now."
    lines = []
    for p in promos[:4]:
        name, ends, what = (
            _pick(p, "name", zh),
            _when(p.get("ends_at"), zh),
            _pick(p, "description", zh),
        )
        lines.append(f"{name}（至{ends}）：{what}" if zh else f"{name} (until {ends}): {what}")
    if zh:
        return "当前进行中的活动：" + "；".join(s.rstrip("。") for s in lines) + "。"
    return "Current promotions: " + "; ".join(s.rstrip(".") for s in lines) + "."


def _refund(r: dict[str, Any], zh: bool) -> str:
    steps = r.get("next_steps_zh" if zh else "next_steps") or r.get("next_steps") or []
    steps = [str(s) for s in steps]
    amount = _money(r.get("amount"), zh)
    if zh:
        text = (
            f"已为订单{r.get('order_id')}提交退款申请（单号{r.get('refund_id')}，金额{amount}）。"
        )
        if steps:
            text += "接下来：" + "".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
        return text
    text = (
        f"I've opened refund request {r.get('refund_id')} for order {r.get('order_id')} ({amount})."
    )
    if steps:
        text += " Next steps: " + " ".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    return text


def _error(e: dict[str, Any], zh: bool) -> str:
    body = e.get("body")
    if isinstance(body, str):
        # A tool runner that wraps the backend's error: {"error": "HTTP 404", "body": "..."}.
        try:
            inner = json.loads(body)
        except ValueError:
            inner = None
        if isinstance(inner, dict) and "error" in inner:
            e = inner
    code = str(e.get("error") or "")
    if code == "sign_in_required":
        # The tool runner refused: the shopper is anonymous. A model tells them to sign in.
        if zh:
            return "为了保护您的隐私，查询订单需要先确认您的身份：请登录商城账号后再问我一次。"
        return (
            "To look up your orders I need to know it's you: please sign in to your account "
            "on the shop and ask me again."
        )
    not_found = code.endswith("not_found") or code == "HTTP 404"
    if zh:
        if e.get("detail_zh"):
            return f"抱歉，{str(e['detail_zh']).rstrip('。')}。"
        if not_found:
            return "抱歉，没有查到相关记录，请核对编号后再发给我。"
        return "抱歉，系统暂时没能处理这个请求，我已记录下来，稍后为您跟进。"
    detail = str(e.get("detail") or code).rstrip(".")
    if not_found:
        return f"Sorry, I couldn't find that: {detail}. Could you check it and send it again?"
    return f"Sorry, that didn't work: {detail}."


def _generic(value: Any, zh: bool) -> str:
    if isinstance(value, dict):
        facts = [
            f"{k.replace('_', ' ')}: {v}"
            for k, v in value.items()
            if isinstance(v, str | int | float) and not isinstance(v, bool)
        ][:6]
        body = "; ".join(facts) if facts else json.dumps(value, ensure_ascii=False)[:200]
    else:
        body = str(value)[:200]
    return f"查询结果：{body}。" if zh else f"Here is what I found: {body}."


def _describe(value: Any, zh: bool) -> str:
    """One paragraph about one tool result, by its shape."""
    if not isinstance(value, dict):
        return _generic(value, zh)
    writer: Callable[[dict[str, Any], bool], str] | None = None
    if "error" in value:
        writer = _error
    elif "refund_id" in value:
        writer = _refund
    elif "events" in value and "tracking_number" in value:
        writer = _parcel
    elif "items" in value and "status" in value:
        writer = _order
    elif "products" in value:
        writer = _search
    elif "promotions" in value:
        writer = _promotions
    elif "code" in value and "discount" in value:
        writer = _coupon
    elif "sku" in value and "price" in value:
        writer = _product
    return writer(value, zh) if writer is not None else _generic(value, zh)


def answer_from_results(results: list[str], question: str) -> str:
    """The answer to `question` from the tool results (JSON texts), in the shopper's language."""
    zh = mostly_chinese(question)
    paragraphs = []
    for content in results:
        try:
            value: Any = json.loads(content)
        except ValueError:
            value = content.strip()
        paragraphs.append(_describe(value, zh))
    closing = _CLOSING[1] if zh else _CLOSING[0]
    return ("" if zh else " ").join([*paragraphs, closing])


_WANTED_ZH = {
    "order_id": "订单号（例如 ORD-1001）",
    "tracking": "快递单号",
    "sku": "商品编号（例如 EL-1001）",
    "code": "优惠码",
}


def ask_for(wanted: list[tuple[str, str]], question: str) -> str:
    """Ask the shopper for the ids a tool needs ("the order id, like ORD-1001")."""
    if mostly_chinese(question):
        things = "或".join(_WANTED_ZH.get(kind, desc) for kind, desc in wanted)
        return f"好的，我来帮您查询。请提供一下您的{things}，我马上为您处理。"
    phrases = [desc.strip().rstrip(".") for _, desc in wanted]
    if len(phrases) > 1:
        phrases = [f"{p}," if "," in p else p for p in phrases[:-1]] + phrases[-1:]
    phrases = [p[:1].lower() + p[1:] for p in phrases]
    return f"I can look that up for you. Could you send me {' or '.join(phrases)}?"
