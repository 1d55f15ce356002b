"""The demo shop's tool definitions, and calling one the way a tool runner does."""

from __future__ import annotations

from importlib import resources
from typing import Any

import httpx
import yaml

from orchestration.config import ToolSettings
from orchestration.tools import ToolRunner

DEMO_SHOPPER = "demo-shopper"  # owns ORD-1001 ... ORD-1008 in the demo data


def demo_tools() -> list[dict[str, Any]]:
    """bot/demo_shop/tools.yaml: [{name, description, method, url, parameters}]."""
    text = resources.files("bot.demo_shop").joinpath("tools.yaml").read_text("utf-8")
    return list(yaml.safe_load(text))


def openai_tools(names: list[str] | None = None) -> list[dict[str, Any]]:
    """The demo tools as an OpenAI `tools` array (all, or the named ones)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["parameters"],
            },
        }
        for t in demo_tools()
        if names is None or t["name"] in names
    ]


async def call_tool(
    http: httpx.AsyncClient,
    name: str,
    arguments_json: str,
    shop_user_id: str | None = DEMO_SHOPPER,
) -> str:
    """Run one demo tool with the service's own tool runner against the shop at `http`'s base
    URL, for `shop_user_id` (None: an anonymous shopper); what the model would read."""
    runner = ToolRunner(ToolSettings(**t) for t in demo_tools())
    runner.base_url = str(http.base_url)
    try:
        return await runner.call(name, arguments_json, timeout_s=10, shop_user_id=shop_user_id)
    finally:
        await runner.aclose()
