"""HTTP API of the demo shop: orders, parcel tracking, products, coupons, promotions, refunds.

A stand-in for a shop's own backend, so the specialists' tools have something real to call
on the embedded defaults. JSON in and out; errors are {"error": code, "detail": text} (plus
"detail_zh" where a shopper would read it), 404 for ids that don't exist.

Orders, parcels and refunds are a shopper's own: each call names the shop user it is for
(`shop_user_id`, which swarmdesk fills from the verified identity), and another shopper's
order is as unknown as one that does not exist.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from aiohttp import web

from bot.demo_shop import refunds
from bot.demo_shop.data import SHOP_TZ, ShopData, load, parse_time, public
from channels.http import ApiError, json_errors, read_json

_DATA = web.AppKey("demo_shop_data", ShopData)


class _RefundBook:
    """Refund requests opened while this app runs, by order id; the sample data stays as is."""

    def __init__(self) -> None:
        self.by_order: dict[str, dict[str, Any]] = {}
        self.seq = itertools.count(1)


_REFUNDS = web.AppKey("demo_shop_refunds", _RefundBook)

_MAX_SEARCH_RESULTS = 50
_CATEGORIES = ("electronics", "clothing", "home")


def _now() -> datetime:
    return datetime.now(SHOP_TZ)


def _order_id(raw: str) -> str:
    """'ord-1001', ' ORD-1001 ' and '1001' all name ORD-1001."""
    value = raw.strip().upper()
    return f"ORD-{value}" if value.isdigit() else value


def _shopper(request: web.Request, body: dict[str, Any] | None = None) -> str:
    """The shop user a call is for (query string, or the JSON body of a POST)."""
    value = request.query.get("shop_user_id") if body is None else body.get("shop_user_id")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(
            400, "missing_shop_user_id", "shop_user_id is required: whose order is this?"
        )
    return value.strip()


def _owned_order(request: web.Request, raw_id: str, shopper: str) -> dict[str, Any]:
    """The order, if it is the shopper's; someone else's is reported exactly like a missing
    one, so ids cannot be probed."""
    oid = _order_id(raw_id)
    order = request.app[_DATA].orders.get(oid)
    if order is None or order.get("customer_id") != shopper:
        raise ApiError(
            404,
            "order_not_found",
            f"no order {oid} in this shopper's account; order ids look like ORD-1001",
        )
    return order


def _order_view(request: web.Request, order: dict[str, Any]) -> dict[str, Any]:
    view = public(order)
    opened = request.app[_REFUNDS].by_order.get(order["id"])
    if opened is not None:
        view["status"] = "refund_requested"
        view["refund"] = {
            "id": opened["refund_id"],
            "status": opened["status"],
            "type": opened["type"],
            "reason": opened["reason"],
            "requested_at": opened["requested_at"],
        }
    return view


def _product_summary(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "sku": p["sku"],
        "name": p["name"],
        "name_zh": p["name_zh"],
        "category": p["category"],
        "price": p["price"],
        "currency": "CNY",
        "stock": p["stock"],
        "in_stock": p["stock"] > 0,
    }


def _product_view(p: dict[str, Any]) -> dict[str, Any]:
    view = public(p)
    view.pop("tags", None)
    view.pop("tags_zh", None)
    view["currency"] = "CNY"
    view["in_stock"] = p["stock"] > 0
    return view


async def index(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "name": "swarmdesk demo shop",
            "endpoints": [
                "GET /demo-shop/api/orders/{order_id}?shop_user_id=...",
                "GET /demo-shop/api/tracking/{tracking_number}?shop_user_id=...",
                "GET /demo-shop/api/products?q=...",
                "GET /demo-shop/api/products/{sku}",
                "GET /demo-shop/api/coupons/{code}",
                "GET /demo-shop/api/promotions",
                "POST /demo-shop/api/refunds {order_id, reason, shop_user_id}",
            ],
            "sample_ids": {
                "order_id": "ORD-1001 ... ORD-1008 (shop_user_id demo-shopper)",
                "sku": sorted(request.app[_DATA].products)[:3],
                "coupon": ["SAVE50", "DOUBLE11", "SUMMER30"],
            },
        }
    )


async def get_order(request: web.Request) -> web.Response:
    order = _owned_order(request, request.match_info["order_id"], _shopper(request))
    return web.json_response(_order_view(request, order))


async def get_tracking(request: web.Request) -> web.Response:
    shopper = _shopper(request)
    number = request.match_info["tracking_number"].strip().upper()
    data = request.app[_DATA]
    parcel = data.tracking.get(number)
    if parcel is None or data.parcel_owner.get(number) != shopper:
        raise ApiError(
            404,
            "tracking_not_found",
            f"no parcel with tracking number {number}; check the number on the order page",
        )
    view = public(parcel)
    if view["events"]:
        view["latest_event"] = max(view["events"], key=lambda e: e["time"])
    return web.json_response(view)


async def search_products(request: web.Request) -> web.Response:
    query = request.query.get("q", request.query.get("query", ""))
    category = request.query.get("category") or None
    if category is not None and category not in _CATEGORIES:
        raise ApiError(400, "invalid_category", f"category must be one of {', '.join(_CATEGORIES)}")
    try:
        limit = int(request.query.get("limit", "10"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= _MAX_SEARCH_RESULTS:
        raise ApiError(
            400, "invalid_limit", f"limit must be a whole number from 1 to {_MAX_SEARCH_RESULTS}"
        )
    found = request.app[_DATA].search_products(query, category)
    return web.json_response(
        {
            "query": query,
            "category": category,
            "count": len(found),
            "products": [_product_summary(p) for p in found[:limit]],
        }
    )


async def get_product(request: web.Request) -> web.Response:
    sku = request.match_info["sku"].strip().upper()
    product = request.app[_DATA].products.get(sku)
    if product is None:
        raise ApiError(
            404,
            "product_not_found",
            f"no product {sku}; SKUs look like EL-1001, or search with /products?q=...",
        )
    return web.json_response(_product_view(product))


async def get_coupon(request: web.Request) -> web.Response:
    code = request.match_info["code"].strip().upper()
    coupon = request.app[_DATA].coupons.get(code)
    if coupon is None:
        raise ApiError(404, "coupon_not_found", f"no coupon {code}; check the spelling of the code")
    view = public(coupon)
    view["currency"] = "CNY"
    return web.json_response(view)


async def list_promotions(request: web.Request) -> web.Response:
    now = _now()
    current = [
        public(p)
        for p in request.app[_DATA].promotions
        if parse_time(p["starts_at"]) <= now <= parse_time(p["ends_at"])
    ]
    return web.json_response({"count": len(current), "promotions": current})


async def request_refund(request: web.Request) -> web.Response:
    body = await read_json(request)
    raw_id = body.get("order_id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise ApiError(400, "missing_order_id", "order_id is required, e.g. ORD-1001")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(
            400, "missing_reason", "reason is required: say briefly why, e.g. 'arrived damaged'"
        )
    reason = " ".join(reason.split())
    if len(reason) > refunds.MAX_REASON_CHARS:
        raise ApiError(
            400, "reason_too_long", f"keep the reason under {refunds.MAX_REASON_CHARS} characters"
        )
    order = _owned_order(request, raw_id, _shopper(request, body))
    oid = order["id"]
    current = _order_view(request, order)
    now = _now()
    refused = refunds.refusal(current, now)
    if refused is not None:
        return web.json_response(
            {"error": refused.code, "detail": refused.detail, "detail_zh": refused.detail_zh},
            status=409,
        )
    book = request.app[_REFUNDS]
    record = refunds.open_request(current, reason, now, next(book.seq))
    book.by_order[oid] = record
    return web.json_response(record, status=201)


def build_demo_shop_app(max_body_bytes: int = 64 * 1024) -> web.Application:
    """The demo shop API as an aiohttp sub-application (mounted under /demo-shop).

    Pass the main application's body limit: aiohttp enforces the main one, and error
    messages quote this one.
    """
    app = web.Application(middlewares=[json_errors], client_max_size=max_body_bytes)
    app[_DATA] = load()
    app[_REFUNDS] = _RefundBook()
    app.router.add_get("/api", index)
    app.router.add_get("/api/orders/{order_id}", get_order)
    app.router.add_get("/api/tracking/{tracking_number}", get_tracking)
    app.router.add_get("/api/products", search_products)
    app.router.add_get("/api/products/{sku}", get_product)
    app.router.add_get("/api/coupons/{code}", get_coupon)
    app.router.add_get("/api/promotions", list_promotions)
    app.router.add_post("/api/refunds", request_refund)
    return app
