"""Tools of the shop's backend: OpenAI function tools executed as HTTP calls."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from orchestration.config import ToolSettings

log = structlog.get_logger(__name__)

_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")
MAX_RESULT_CHARS = 6000  # what a tool may put into the model's context


class ToolRunner:
    """Executes tool calls over one pooled HTTP client.

    A relative tool URL is resolved against `base_url`: this service's own address, which is
    known only once it listens (the demo shop lives there).
    """

    def __init__(self, tools: Iterable[ToolSettings], base_url: str | None = None) -> None:
        self.tools = {t.name: t for t in tools}
        self.base_url = base_url
        self._http: httpx.AsyncClient | None = None

    def definitions(self, names: Sequence[str], *, verified: bool) -> list[dict[str, Any]]:
        """The OpenAI `tools` array for a specialist (tools that need a verified shopper are
        left out for an anonymous one)."""
        out = []
        for name in names:
            t = self.tools.get(name)
            if t is None or (t.requires_verified_user and not verified):
                continue
            out.append(
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
            )
        return out

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def call(self, name: str, arguments_json: str, *, timeout_s: float) -> str:
        """Run one tool call; the result (or the error) as a JSON string for the model."""
        t0 = time.monotonic()
        tool = self.tools.get(name)
        if tool is None:
            return _error(f"unknown tool {name!r}")
        try:
            args = json.loads(arguments_json or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as e:
            return _error(f"invalid arguments: {e}")
        try:
            url, rest = self._url(tool, args)
        except KeyError as e:
            return _error(f"missing argument {e.args[0]!r}")
        headers = dict(tool.headers)
        if tool.auth_env and os.environ.get(tool.auth_env):
            headers["Authorization"] = f"Bearer {os.environ[tool.auth_env]}"
        try:
            if tool.method in ("GET", "DELETE"):
                resp = await self._client().request(
                    tool.method,
                    url,
                    params=_query(rest),
                    headers=headers,
                    timeout=min(timeout_s, tool.timeout_seconds),
                )
            else:
                resp = await self._client().request(
                    tool.method,
                    url,
                    json=rest,
                    headers=headers,
                    timeout=min(timeout_s, tool.timeout_seconds),
                )
        except httpx.HTTPError as e:
            log.warning("tool_failed", tool=name, error=repr(e))
            return _error(f"the shop's system did not answer ({type(e).__name__})")
        body = resp.text
        log.debug(
            "tool_called",
            tool=name,
            status=resp.status_code,
            ms=round((time.monotonic() - t0) * 1000, 1),
        )
        if resp.status_code >= 400:
            return json.dumps(
                {"error": f"HTTP {resp.status_code}", "body": body[:1000]}, ensure_ascii=False
            )
        return body[:MAX_RESULT_CHARS]

    def _url(self, tool: ToolSettings, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        used: set[str] = set()

        def fill(m: re.Match[str]) -> str:
            used.add(m.group(1))
            return quote(str(args[m.group(1)]), safe="")

        path = _PLACEHOLDER.sub(fill, tool.url)
        if not path.startswith(("http://", "https://")):
            if not self.base_url:
                raise RuntimeError("relative tool URL before the service knows its address")
            path = self.base_url.rstrip("/") + "/" + path.lstrip("/")
        return path, {k: v for k, v in args.items() if k not in used}


def _query(args: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()}


def _error(detail: str) -> str:
    return json.dumps({"error": detail}, ensure_ascii=False)
