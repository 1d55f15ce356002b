"""Tools of the shop's backend: OpenAI function tools executed as HTTP calls.

What the model sends is untrusted input: arguments are validated against the tool's JSON
schema, only declared ones go out, path values cannot walk the URL, and the shopper's id
comes from the verified identity, never from the model.
"""

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
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from orchestration.config import PLACEHOLDER, SHOP_USER_ID, ToolSettings

log = structlog.get_logger(__name__)

MAX_RESULT_CHARS = 6000  # what a tool may put into the model's context
# A path value that could change which resource the URL names.
_UNSAFE_PATH_VALUE = re.compile(r"\.\.|[/\\]|[\x00-\x1f\x7f]")
SIGN_IN_REQUIRED = {
    "error": "sign_in_required",
    "detail": "the shopper is not signed in, so their orders cannot be looked up; ask them to "
    "sign in to the shop (or write from their account) and ask again",
    "detail_zh": "您还没有登录，暂时无法查询您的订单。请先登录商城账号后再问我",
}


class ToolRunner:
    """Executes tool calls over one pooled HTTP client.

    A relative tool URL is resolved against `base_url`: this service's own address, which is
    known only once it listens (the demo shop lives there).
    """

    def __init__(self, tools: Iterable[ToolSettings], base_url: str | None = None) -> None:
        self.tools = {t.name: t for t in tools}
        self._validators: dict[str, Validator] = {
            name: validator_for(t.parameters)(t.parameters) for name, t in self.tools.items()
        }
        self.base_url = base_url
        self._http: httpx.AsyncClient | None = None

    def read_only(self, names: Sequence[str]) -> bool:
        """Whether calling these tools changes nothing in the shop (GET only; the built-in
        knowledge search is not a shop tool)."""
        return all(t.method == "GET" for n in names if (t := self.tools.get(n)) is not None)

    def definitions(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """The OpenAI `tools` array for a specialist. Tools that need a verified shopper are
        offered to anonymous ones too: the call is answered with "sign in first" (and never
        reaches the shop), which the model can pass on."""
        out = []
        for name in names:
            t = self.tools.get(name)
            if t is None:
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

    async def call(
        self, name: str, arguments_json: str, *, timeout_s: float, shop_user_id: str | None
    ) -> str:
        """Run one tool call for the shopper `shop_user_id` (None: not verified); the result
        (or the error) as a JSON string for the model."""
        t0 = time.monotonic()
        tool = self.tools.get(name)
        if tool is None:
            return _error(f"unknown tool {name!r}")
        if tool.requires_verified_user and not shop_user_id:
            return json.dumps(SIGN_IN_REQUIRED, ensure_ascii=False)
        try:
            args = self._arguments(tool, arguments_json)
            url, rest = self._url(tool, args, shop_user_id)
        except ValueError as e:
            return _error(f"invalid arguments: {e}")
        for key, template in tool.bound_arguments.items():
            rest[key] = _fill_identity(template, shop_user_id)
        headers = {k: _fill_identity(v, shop_user_id) for k, v in tool.headers.items()}
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

    def _arguments(self, tool: ToolSettings, arguments_json: str) -> dict[str, Any]:
        """The model's arguments, valid under the tool's schema, without undeclared ones."""
        try:
            args = json.loads(arguments_json or "{}")
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from e
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        problem = next(iter(self._validators[tool.name].iter_errors(args)), None)
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path)
            raise ValueError(f"{where + ': ' if where else ''}{problem.message[:300]}")
        declared = tool.parameters.get("properties") or {}
        return {k: v for k, v in args.items() if k in declared}

    def _url(
        self, tool: ToolSettings, args: dict[str, Any], shop_user_id: str | None
    ) -> tuple[str, dict[str, Any]]:
        used: set[str] = set()

        def fill(m: re.Match[str]) -> str:
            name = m.group(1)
            if name == SHOP_USER_ID:
                return quote(shop_user_id or "", safe="")
            used.add(name)
            if name not in args:
                raise ValueError(f"missing argument {name!r}")
            value = args[name]
            text = value if isinstance(value, str) else json.dumps(value)
            if not text or _UNSAFE_PATH_VALUE.search(text):
                raise ValueError(f"{name!r} must not be empty or contain '..', '/' or '\\'")
            return quote(text, safe="")

        path = PLACEHOLDER.sub(fill, tool.url)
        if not path.startswith(("http://", "https://")):
            if not self.base_url:
                raise RuntimeError("relative tool URL before the service knows its address")
            path = self.base_url.rstrip("/") + "/" + path.lstrip("/")
        return path, {k: v for k, v in args.items() if k not in used}


def _fill_identity(template: str, shop_user_id: str | None) -> str:
    return template.replace(f"{{{SHOP_USER_ID}}}", shop_user_id or "")


def _query(args: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()}


def _error(detail: str) -> str:
    return json.dumps({"error": detail}, ensure_ascii=False)
