"""HTTP helpers every webhook and API route shares: JSON errors and bounded bodies."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An error the client can fix; rendered as {"error": code, "detail": ...}."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.detail)


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


async def read_json(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return data
