"""HTTP helpers every webhook and API route shares: JSON errors and bounded bodies."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An error the client can fix; rendered as {"error": code, "detail": ...}."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> web.Response:
        resp = error_response(self.status, self.code, self.detail)
        resp.headers.update(self.headers)
        return resp


def error_response(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


async def read_body(request: web.Request) -> bytes:
    """The whole body, or a 413 ApiError past the app's `client_max_size`."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(
            413,
            "body_too_large",
            f"the body is larger than {request.app._client_max_size} bytes; "
            "send less, or raise server.max_body_bytes",
        ) from e


# No client of ours nests deeper; the limit also keeps the walk below off the recursion limit.
MAX_JSON_DEPTH = 32
# Ids and sequence numbers are 64-bit signed integers in both databases.
ID_LIMIT = 2**63
# Lone surrogates cannot be encoded as UTF-8, and PostgreSQL refuses NUL in text and JSON.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def load_json(data: bytes | str) -> Any:
    """json.loads that refuses (ValueError) what no client sends and storage cannot keep:
    nesting deeper than MAX_JSON_DEPTH, NUL or lone surrogates in strings, integers
    beyond 64 bits."""
    try:
        value = json.loads(data)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                raise ValueError("a string holds NUL or a lone surrogate (\\u0000, \\ud800)")
        elif isinstance(item, bool | float) or item is None:
            continue
        elif isinstance(item, int):
            if not -ID_LIMIT <= item < ID_LIMIT:
                raise ValueError("an integer is beyond 64 bits")
        elif depth >= MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, depth))
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in item)
    return value


def parse_id(raw: str | None) -> int | None:
    """A non-negative 64-bit id or sequence number written in ASCII digits, else None."""
    if raw is None or not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()):
        return None
    value = int(raw)
    return value if value < ID_LIMIT else None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object, or a 400 ApiError that says what is wrong with it."""
    try:
        data = load_json(body)
    except ValueError as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return data


async def read_json(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a client can get is JSON: {"error": code, "detail": ...}."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", "the body is larger than the server accepts")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = e.reason.lower().replace(" ", "_")
        return error_response(e.status, code, e.text or e.reason)
