"""What the model sends to a tool is untrusted (issue 16): arguments are validated against the
tool's JSON schema, undeclared ones never reach the shop, path values cannot walk the URL,
and the shopper's id comes from the verified identity only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from orchestration.config import ToolSettings
from orchestration.tools import ToolRunner


class Backend:
    """A shop backend that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append(
            {
                "method": request.method,
                "path": request.raw_path.split("?", 1)[0],
                "query": dict(request.query),
                "body": body,
                "headers": dict(request.headers),
            }
        )
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    await b.start()
    yield b
    assert b.runner is not None
    await b.runner.cleanup()


ORDER = {
    "name": "get_order",
    "description": "one order",
    "url": "/orders/{order_id}",
    "bound_arguments": {"shop_user_id": "{shop_user_id}"},
    "headers": {"X-Shopper": "{shop_user_id}"},
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string", "maxLength": 20}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
}
# A looser schema: extra arguments pass validation but still must not be forwarded.
REFUND = {
    "name": "request_refund",
    "description": "refund",
    "method": "POST",
    "url": "/refunds",
    "bound_arguments": {"shop_user_id": "{shop_user_id}"},
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "reason": {"type": "string"}},
        "required": ["order_id", "reason"],
    },
}
PRODUCT = {
    "name": "get_product",
    "description": "a product",
    "url": "/products/{sku}",
    "requires_verified_user": False,
    "parameters": {
        "type": "object",
        "properties": {"sku": {"type": "string"}},
        "required": ["sku"],
    },
}


@pytest.fixture
async def tools(backend: Backend) -> AsyncIterator[ToolRunner]:
    runner = ToolRunner([ToolSettings(**t) for t in (ORDER, REFUND, PRODUCT)], backend.url)
    yield runner
    await runner.aclose()


async def call(runner: ToolRunner, name: str, args: Any, user: str | None = "u-1") -> Any:
    raw = args if isinstance(args, str) else json.dumps(args)
    return json.loads(await runner.call(name, raw, timeout_s=5, shop_user_id=user))


async def test_the_verified_shopper_id_is_bound_not_taken_from_the_model(
    tools: ToolRunner, backend: Backend
) -> None:
    assert await call(tools, "get_order", {"order_id": "ORD-1"}) == {"ok": True}
    got = backend.requests[-1]
    assert got["path"] == "/orders/ORD-1" and got["query"] == {"shop_user_id": "u-1"}
    assert got["headers"]["X-Shopper"] == "u-1"
    # The model trying to name another shopper: refused by the schema, nothing sent.
    out = await call(tools, "get_order", {"order_id": "ORD-1", "shop_user_id": "u-2"})
    assert "invalid arguments" in out["error"] and len(backend.requests) == 1
    # With a loose schema the extra argument is dropped, and the bound one wins.
    await call(
        tools,
        "request_refund",
        {"order_id": "ORD-1", "reason": "broken", "shop_user_id": "u-2", "admin": True},
    )
    assert backend.requests[-1]["body"] == {
        "order_id": "ORD-1",
        "reason": "broken",
        "shop_user_id": "u-1",
    }


async def test_a_shoppers_tool_needs_a_verified_shopper(
    tools: ToolRunner, backend: Backend
) -> None:
    out = await call(tools, "get_order", {"order_id": "ORD-1"}, user=None)
    assert out["error"] == "sign_in_required" and "sign in" in out["detail"]
    assert backend.requests == []
    # Public data needs no identity.
    assert await call(tools, "get_product", {"sku": "EL-1"}, user=None) == {"ok": True}


@pytest.mark.parametrize(
    "args",
    [
        {"order_id": 1001},  # wrong type
        {"order_id": "x" * 21},  # too long
        {},  # required missing
        {"order_id": "ORD-1", "extra": "x"},  # additionalProperties: false
        ["ORD-1"],  # not an object
        "{not json",
    ],
)
async def test_arguments_are_validated_against_the_schema(
    tools: ToolRunner, backend: Backend, args: Any
) -> None:
    out = await call(tools, "get_order", args)
    assert out["error"].startswith("invalid arguments")
    assert backend.requests == []


@pytest.mark.parametrize("value", ["..", "../admin", "a/b", "..%2Fadmin", "a\\b", "x\ny", ""])
async def test_path_values_cannot_walk_the_url(
    tools: ToolRunner, backend: Backend, value: str
) -> None:
    out = await call(tools, "get_product", {"sku": value})
    assert out["error"].startswith("invalid arguments"), value
    assert backend.requests == []


async def test_path_values_are_encoded(tools: ToolRunner, backend: Backend) -> None:
    await call(tools, "get_product", {"sku": "A?b#c d"})
    assert backend.requests[-1]["path"] == "/products/A%3Fb%23c%20d"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"parameters": {"type": "object", "properties": {"shop_user_id": {"type": "string"}}}},
            "must not set 'shop_user_id'",
        ),
        ({"requires_verified_user": False}, "needs requires_verified_user"),
        ({"parameters": {"type": "object", "properties": {"order_id": {"type": 5}}}}, "schema"),
        ({"url": "/orders/{order_id}/{other}"}, "{other}"),
        ({"bound_arguments": {"order_id": "{shop_user_id}"}}, "both a parameter"),
        ({"bound_arguments": {"who": "{email}"}}, "may use only"),
    ],
)
def test_unsafe_tool_configs_are_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as e:
        ToolSettings(**{**ORDER, **change})
    assert problem in str(e.value)


def test_tools_need_a_verified_shopper_unless_marked_public() -> None:
    tool = ToolSettings(name="t", description="d", url="/x")
    assert tool.requires_verified_user is True
