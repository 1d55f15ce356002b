"""A shopper sees only their own orders (issue 16, Critical): order tools run only for a
verified shop user, receive that user's id from swarmdesk (never from the model), and the
demo shop refuses another shopper's order."""

# ruff: noqa: F811  (the `svc` fixture is imported, then named by every test)

from __future__ import annotations

from sqlalchemy import select

from storage.models import Contact, Conversation
from tests.demo_tools import DEMO_SHOPPER
from tests.support import RunningService
from tests.test_orchestration import ask
from tests.test_widget_protocol import svc  # noqa: F401  (the service with the widget sites)
from tests.widget_support import is_final, new_token, socket

ORD_1001_TRACKING = "SF1746814538401"  # demo-shopper's parcel
ORD_1013_TRACKING = "YT7730689857531"  # demo-shopper-2's parcel


async def order_status(svc: RunningService, order_id: str, owner: str) -> str:
    r = await svc.client.get(f"/demo-shop/api/orders/{order_id}", params={"shop_user_id": owner})
    assert r.status_code == 200, r.text
    return str(r.json()["status"])


async def test_an_anonymous_api_shopper_is_asked_to_sign_in(svc: RunningService) -> None:
    _, _, _, final = await ask(svc, "where is my order ORD-1001?", shop_user_id=None)
    assert "sign in" in final["text"]
    assert ORD_1001_TRACKING not in final["text"] and "SF Express" not in final["text"]


async def test_arriving_on_the_api_verifies_no_one(svc: RunningService) -> None:
    cid, _, _, _ = await ask(svc, "hello", contact="anon", shop_user_id=None)
    async with svc.services.sessions() as s:
        conv = await s.get(Conversation, cid)
        assert conv is not None
        contact = (await s.execute(select(Contact).where(Contact.id == conv.contact_id))).scalar()
    assert contact is not None
    assert contact.attributes["verified"] is False and contact.attributes["shop_user_id"] is None


async def test_a_verified_shopper_sees_their_own_order(svc: RunningService) -> None:
    _, _, _, final = await ask(svc, "where is my order ORD-1001?", shop_user_id=DEMO_SHOPPER)
    assert ORD_1001_TRACKING in final["text"] or "SF Express" in final["text"]


async def test_another_shoppers_order_is_not_shown(svc: RunningService) -> None:
    _, _, _, final = await ask(svc, "where is my order ORD-1013?", shop_user_id=DEMO_SHOPPER)
    assert ORD_1013_TRACKING not in final["text"] and "delivered" not in final["text"]
    assert "couldn't find" in final["text"]
    # Its owner does see it.
    _, _, _, final = await ask(
        svc, "where is my order ORD-1013?", contact="owner", shop_user_id="demo-shopper-2"
    )
    assert "delivered" in final["text"]


async def test_no_refund_on_another_shoppers_order(svc: RunningService) -> None:
    _, _, _, final = await ask(
        svc,
        "request refund for ORD-1013 because it arrived broken",
        shop_user_id=DEMO_SHOPPER,
    )
    assert "RF-1013" not in final["text"]
    assert await order_status(svc, "ORD-1013", "demo-shopper-2") == "delivered"
    # Anonymous: refused before the shop is even asked.
    await ask(svc, "request refund for ORD-1013 because it arrived broken", shop_user_id=None)
    assert await order_status(svc, "ORD-1013", "demo-shopper-2") == "delivered"


async def test_an_anonymous_widget_visitor_gets_no_order_data(svc: RunningService) -> None:
    async with socket(svc) as ws:
        await ws.hello(new_token())
        await ws.say("where is my order ORD-1001?")
        final = (await ws.until(is_final))[-1]
    text = final["text"]
    assert "sign in" in text and ORD_1001_TRACKING not in text


async def test_the_demo_page_signs_its_visitor_in_as_the_demo_shopper(
    svc: RunningService,
) -> None:
    page = (await svc.client.get("/")).text
    user_id = page.split('data-user-id="', 1)[1].split('"', 1)[0]
    user_hash = page.split('data-user-hash="', 1)[1].split('"', 1)[0]
    assert user_id == DEMO_SHOPPER and len(user_hash) == 64
    async with socket(svc, site="demo", origin=svc.base_url) as ws:
        ready = await ws.hello(new_token(), user={"id": user_id, "hash": user_hash})
        assert ready["verified"] is True
        await ws.say("where is my order ORD-1001?")
        final = (await ws.until(is_final))[-1]
    text = final["text"]
    assert ORD_1001_TRACKING in text or "SF Express" in text
    # The page's signature is for the demo shopper only: another id with it is anonymous.
    async with socket(svc, site="demo", origin=svc.base_url) as ws:
        ready = await ws.hello(new_token(), user={"id": "demo-shopper-2", "hash": user_hash})
        assert ready["verified"] is False
