"""HTTP helpers every webhook and API route shares: JSON errors and bounded bodies."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
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


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object, or a 400 ApiError that says what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
