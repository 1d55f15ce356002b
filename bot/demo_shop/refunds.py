"""Whether an order can be refunded now, and what the shopper does next (demo shop rules).

The rules follow common Chinese e-commerce practice: an unshipped order is cancelled and
refunded at once; a parcel on its way must arrive (or be refused at the door) first; a
delivered order can be returned within 7 days of delivery ("七天无理由退货").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bot.demo_shop.data import parse_time

RETURN_WINDOW = timedelta(days=7)
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no refund request can be opened; becomes a 409 with these texts."""

    code: str
    detail: str
    detail_zh: str


def refusal(order: dict[str, Any], now: datetime) -> Refusal | None:
    """None when a refund request may be opened for `order` (in its current state)."""
    oid = order["id"]
    status = order["status"]
    if status == "pending_payment":
        return Refusal(
            "not_paid",
            f"{oid} has not been paid, so there is nothing to refund; an unpaid order is "
            "closed automatically when its payment time runs out.",
            f"订单{oid}尚未付款，无需退款；未付款订单超时后会自动关闭。",
        )
    if status in ("shipped", "in_transit"):
        return Refusal(
            "in_transit",
            f"{oid} is already on its way with {order.get('courier') or 'the courier'}; a "
            "refund can be requested once it is delivered, or refuse the parcel at the door "
            "and the refund starts when it is back in our warehouse.",
            f"订单{oid}已发货（{order.get('courier_zh') or '快递'}运输中），"
            "请签收后再申请退货退款，或在派送时拒收，包裹退回仓库后自动退款。",
        )
    if status == "cancelled":
        return Refusal(
            "cancelled",
            f"{oid} was cancelled and its payment has already been returned.",
            f"订单{oid}已取消，款项已原路退回。",
        )
    if status == "refund_requested":
        refund_id = (order.get("refund") or {}).get("id", "")
        return Refusal(
            "refund_open",
            f"A refund request ({refund_id}) for {oid} is already being processed.",
            f"订单{oid}已有退款申请（{refund_id}）正在处理中。",
        )
    if status == "refunded":
        return Refusal(
            "already_refunded",
            f"{oid} has already been refunded.",
            f"订单{oid}已退款完成。",
        )
    if status == "delivered":
        delivered = parse_time(order["delivered_at"])
        closes = delivered + RETURN_WINDOW
        if now > closes:
            day = closes.date().isoformat()
            return Refusal(
                "return_window_closed",
                f"The 7-day return window for {oid} ended on {day}. Items under warranty can "
                "still be repaired: ask for a warranty claim.",
                f"订单{oid}的七天无理由退货期已于{day}结束；在保修期内的商品可以申请保修服务。",
            )
    return None


def open_request(order: dict[str, Any], reason: str, now: datetime, seq: int) -> dict[str, Any]:
    """The refund request record for an order `refusal` accepted."""
    oid = order["id"]
    shipped = order["status"] == "delivered"
    kind = "return_and_refund" if shipped else "cancel_and_refund"
    method = (order.get("payment") or {}).get("method") or "the original payment method"
    method_zh = (order.get("payment") or {}).get("method_zh") or "原支付方式"
    if shipped:
        next_steps = [
            "Pack the items with their accessories and receipt.",
            "Ship them back within 7 days using the return address on the refund page, "
            "and enter the return tracking number there.",
            f"The refund of CNY {order['total']:.2f} goes back to {method} within 1-3 "
            "business days after the warehouse checks the items.",
        ]
        next_steps_zh = [
            "请将商品连同配件、发票一起打包。",
            "7天内按退款页面上的退货地址寄回，并在页面填写退货快递单号。",
            f"仓库验收后1-3个工作日内，{order['total']:.2f}元将原路退回{method_zh}。",
        ]
    else:
        next_steps = [
            f"{oid} will be cancelled before it ships; nothing needs to be sent back.",
            f"The refund of CNY {order['total']:.2f} goes back to {method} within 1-3 "
            "business days.",
        ]
        next_steps_zh = [
            f"订单{oid}将在发货前取消，无需寄回任何商品。",
            f"{order['total']:.2f}元将在1-3个工作日内原路退回{method_zh}。",
        ]
    return {
        "refund_id": f"RF-{oid.removeprefix('ORD-')}-{seq}",
        "order_id": oid,
        "status": "submitted",
        "type": kind,
        "amount": order["total"],
        "currency": order.get("currency", "CNY"),
        "reason": reason,
        "requested_at": now.replace(microsecond=0).isoformat(),
        "next_steps": next_steps,
        "next_steps_zh": next_steps_zh,
    }
