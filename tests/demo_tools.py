"""The demo shop's tool definitions, and calling one the way a tool runner does."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any
from urllib.parse import quote

import httpx
import yaml

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


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


async def call_tool(http: httpx.AsyncClient, name: str, arguments_json: str) -> httpx.Response:
    """Placeholders fill the path; other arguments go in the query (GET) or JSON body (POST)."""
    tool = next(t for t in demo_tools() if t["name"] == name)
    args = json.loads(arguments_json or "{}")
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        used.add(match.group(1))
        return quote(str(args[match.group(1)]), safe="")

    url = _PLACEHOLDER.sub(fill, tool["url"])
    rest = {k: v for k, v in args.items() if k not in used}
    if tool["method"] == "GET":
        return await http.get(url, params=rest)
    return await http.request(tool["method"], url, json=rest)
