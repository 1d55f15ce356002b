"""The demo shop backend under /demo-shop, through the running service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bot.demo_shop.data import load
from bot.settings import Settings
from tests.demo_tools import DEMO_SHOPPER, call_tool, demo_tools
from tests.support import RunningService, start_service

ORDER_STATUSES = {
    "pending_payment",
    "paid",
    "shipped",
    "in_transit",
    "delivered",
    "cancelled",
    "refund_requested",
    "refunded",
}


@pytest.fixture
async def shop(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    svc = await start_service(settings_factory(sqlite_url))
    yield svc
    await svc.stop()


def owner(order_id: str) -> str:
    return str(load().orders[order_id]["customer_id"])


async def get(svc: RunningService, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
    """GET a demo shop path, as the demo shopper unless `shop_user_id` says otherwise."""
    params.setdefault("shop_user_id", DEMO_SHOPPER)
    r = await svc.client.get(f"/demo-shop/api{path}", params=params)
    assert r.headers["content-type"].startswith("application/json")
    return r.status_code, r.json()


async def refund(svc: RunningService, order_id: str, reason: str) -> tuple[int, dict[str, Any]]:
    """A refund request by the order's owner."""
    who = owner(order_id) if order_id in load().orders else DEMO_SHOPPER
    r = await svc.client.post(
        "/demo-shop/api/refunds",
        json={"order_id": order_id, "reason": reason, "shop_user_id": who},
    )
    return r.status_code, r.json()


async def test_order_with_its_parcel_and_products(shop: RunningService) -> None:
    status, order = await get(shop, "/orders/ORD-1001")
    assert status == 200
    assert order["id"] == "ORD-1001" and order["status"] == "in_transit"
    assert order["currency"] == "CNY" and order["payment"]["method"]
    assert order["shipping_address"]["city"]
    assert order["total"] == pytest.approx(
        sum(i["qty"] * i["price"] for i in order["items"])
        - order["discount"]
        + order["shipping_fee"]
    )
    for item in order["items"]:
        status, product = await get(shop, f"/products/{item['sku']}")
        assert status == 200
        assert (product["name"], product["name_zh"]) == (item["name"], item["name_zh"])

    status, parcel = await get(shop, f"/tracking/{order['tracking_number']}")
    assert status == 200
    assert parcel["courier"] == order["courier"] and parcel["order_id"] == "ORD-1001"
    assert parcel["eta"] == order["estimated_delivery"]
    latest = parcel["latest_event"]
    assert latest == max(parcel["events"], key=lambda e: e["time"])
    assert latest["description"] and latest["description_zh"] and latest["location"]

    # Lower case and a bare number name the same order.
    assert (await get(shop, "/orders/ord-1001"))[1]["id"] == "ORD-1001"
    assert (await get(shop, "/orders/1001"))[1]["id"] == "ORD-1001"


async def test_all_orders_are_coherent(shop: RunningService) -> None:
    statuses = set()
    for n in range(1001, 1031):
        who = owner(f"ORD-{n}")
        status, order = await get(shop, f"/orders/ORD-{n}", shop_user_id=who)
        assert status == 200
        statuses.add(order["status"])
        assert order["items"]
        for item in order["items"]:
            assert (await get(shop, f"/products/{item['sku']}"))[0] == 200
        if order["status"] in ("pending_payment", "paid", "cancelled"):
            assert order["tracking_number"] is None
        else:
            status, parcel = await get(
                shop, f"/tracking/{order['tracking_number']}", shop_user_id=who
            )
            assert status == 200 and parcel["order_id"] == order["id"]
    assert statuses == ORDER_STATUSES
    assert (await get(shop, "/orders/ORD-1031"))[0] == 404


async def test_unknown_ids_are_404_with_a_hint(shop: RunningService) -> None:
    for path in (
        "/orders/ORD-9999",
        "/tracking/SF0000000000000",
        "/products/EL-9999",
        "/coupons/NOPE99",
    ):
        status, body = await get(shop, path)
        assert status == 404, path
        assert body["error"].endswith("_not_found") and body["detail"]
    status, body = await get(shop, "/orders/ORD-9999")
    assert "ORD-1001" in body["detail"]  # says what an order id looks like


async def test_product_search_in_english_and_chinese(shop: RunningService) -> None:
    status, found = await get(shop, "/products", q="wireless earbuds")
    assert status == 200 and found["products"][0]["sku"] == "EL-1001"
    status, found = await get(shop, "/products", q="蓝牙耳机多少钱")
    assert found["products"][0]["name_zh"].startswith("无线降噪蓝牙耳机")
    status, found = await get(shop, "/products", query="跑鞋")
    assert [p["sku"] for p in found["products"]] == ["CL-2003"]
    status, found = await get(shop, "/products", q="jackets")
    assert found["products"][0]["sku"] == "CL-2001"
    status, found = await get(shop, "/products", q="家居")
    assert found["count"] >= 5 and {p["category"] for p in found["products"]} == {"home"}
    status, found = await get(shop, "/products", q="", category="clothing")
    assert found["count"] == 8
    status, found = await get(shop, "/products", q="unicorn saddle")
    assert status == 200 and found["count"] == 0 and found["products"] == []
    status, body = await get(shop, "/products", q="x", limit="lots")
    assert status == 400 and "limit" in body["detail"]
    status, body = await get(shop, "/products", category="food")
    assert status == 400 and "electronics" in body["detail"]

    status, product = await get(shop, "/products/cl-2001")
    assert status == 200 and product["category"] == "clothing"
    assert "M" in product["sizes"] and product["colours"] and product["specs"]
    assert product["warranty"]["description"] and product["in_stock"] is True
    status, speaker = await get(shop, "/products/EL-1009")
    assert speaker["stock"] == 0 and speaker["in_stock"] is False


async def test_coupons_and_current_promotions(shop: RunningService) -> None:
    status, coupon = await get(shop, "/coupons/save50")
    assert status == 200
    assert coupon["code"] == "SAVE50" and coupon["status"] == "valid"
    assert coupon["discount"] == {"type": "amount", "amount": 50.0}
    assert coupon["min_spend"] == 300.0 and coupon["stackable"] is False
    assert (await get(shop, "/coupons/WELCOME10"))[1]["discount"]["type"] == "percent"
    assert (await get(shop, "/coupons/SUMMER30"))[1]["status"] == "expired"
    assert (await get(shop, "/coupons/BDAY88"))[1]["status"] == "used"

    status, promos = await get(shop, "/promotions")
    assert status == 200 and promos["count"] == len(promos["promotions"])
    by_id = {p["id"]: p for p in promos["promotions"]}
    assert by_id["PROMO-FULL-300-50"]["rules"]["threshold"] == 300.0
    assert by_id["PROMO-FULL-300-50"]["name_zh"] == "全店满300减50"
    assert "PROMO-D11-PRESALE" in by_id
    assert "PROMO-618" not in by_id  # over already


REFUSALS = [
    ("ORD-1003", "not_paid"),  # pending_payment
    ("ORD-1001", "in_transit"),
    ("ORD-1005", "in_transit"),  # shipped
    ("ORD-1006", "cancelled"),
    ("ORD-1007", "refund_open"),  # refund_requested
    ("ORD-1008", "already_refunded"),
    ("ORD-1010", "return_window_closed"),  # delivered three weeks ago
]


async def test_refund_is_refused_with_the_reason(shop: RunningService) -> None:
    for order_id, code in REFUSALS:
        status, body = await refund(shop, order_id, "changed my mind")
        assert (status, body["error"]) == (409, code), order_id
        assert order_id in body["detail"] and order_id in body["detail_zh"]
    status, body = await refund(shop, "ORD-1001", "changed my mind")
    assert "once it is delivered" in body["detail"] and "SF Express" in body["detail"]


async def test_refund_of_a_delivered_order_then_again(shop: RunningService) -> None:
    status, opened = await refund(shop, "ORD-1002", "  the shoes are   too small ")
    assert status == 201
    assert opened["order_id"] == "ORD-1002" and opened["refund_id"].startswith("RF-1002-")
    assert opened["type"] == "return_and_refund" and opened["status"] == "submitted"
    assert opened["reason"] == "the shoes are too small"
    assert len(opened["next_steps"]) == 3 and len(opened["next_steps_zh"]) == 3
    assert any("7 days" in step for step in opened["next_steps"])

    status, order = await get(shop, "/orders/ORD-1002")
    assert order["status"] == "refund_requested"
    assert order["refund"]["id"] == opened["refund_id"]

    status, body = await refund(shop, "ord-1002", "still too small")
    assert status == 409 and body["error"] == "refund_open"
    assert opened["refund_id"] in body["detail"]


async def test_refund_of_an_unshipped_order_cancels_it(shop: RunningService) -> None:
    status, opened = await refund(shop, "ORD-1004", "ordered the wrong colour")
    assert status == 201
    assert opened["type"] == "cancel_and_refund"
    assert "nothing needs to be sent back" in opened["next_steps"][0]


async def test_refund_request_errors(shop: RunningService) -> None:
    assert (await refund(shop, "ORD-4242", "why not"))[0] == 404
    status, body = await refund(shop, "ORD-1002", "   ")
    assert status == 400 and body["error"] == "missing_reason"
    r = await shop.client.post("/demo-shop/api/refunds", json={"reason": "x"})
    assert r.status_code == 400 and "ORD-1001" in r.json()["detail"]
    r = await shop.client.post("/demo-shop/api/refunds", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    status, body = await refund(shop, "ORD-1002", "x" * 501)
    assert status == 400 and body["error"] == "reason_too_long"
    # Nothing was opened by the failed attempts.
    assert (await get(shop, "/orders/ORD-1002"))[1]["status"] == "delivered"


async def test_every_tool_definition_reaches_its_endpoint(shop: RunningService) -> None:
    samples = {
        "get_order": {"order_id": "ORD-1002"},
        "track_parcel": {"tracking_number": "SF1746814538401"},
        "search_products": {"query": "羽绒服"},
        "get_product": {"sku": "HM-3001"},
        "check_coupon": {"code": "DOUBLE11"},
        "list_promotions": {},
        "request_refund": {"order_id": "ORD-1002", "reason": "arrived scratched"},
    }
    tools = demo_tools()
    assert sorted(t["name"] for t in tools) == sorted(samples)
    for tool in tools:
        schema = tool["parameters"]
        assert schema["type"] == "object" and tool["description"]
        assert set(schema.get("required", [])) <= set(schema["properties"])
        args = samples[tool["name"]]
        assert set(schema.get("required", [])) <= set(args)
        out = await call_tool(shop.client, tool["name"], json.dumps(args))
        assert "error" not in json.loads(out), (tool["name"], out)


async def test_the_demo_shop_can_be_switched_off(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> None:
    svc = await start_service(settings_factory(sqlite_url, demo_shop={"enabled": False}))
    try:
        r = await svc.client.get("/demo-shop/api/orders/ORD-1001")
        assert r.status_code == 404
        assert (await svc.client.get("/healthz")).status_code == 200
    finally:
        await svc.stop()
