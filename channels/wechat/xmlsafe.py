"""Reading callback bodies safely: bounded size, no DTDs, no entities, valid XML/JSON.

WeChat's XML never has a DOCTYPE, entity declarations or processing instructions; a body with
any of them is an attack (XXE, billion laughs) and is refused before a parser sees it.
"""

from __future__ import annotations

import re
from typing import Any

import xmltodict
from aiohttp import web

from channels.http import ApiError

# Any markup declaration except CDATA sections and comments, and any processing instruction
# other than the XML declaration itself.
_FORBIDDEN = re.compile(rb"<!(?!\[CDATA\[|--)|<\?(?!xml[\s?])", re.IGNORECASE)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, or a 400 ApiError when it is larger than `limit` bytes."""
    too_big = ApiError(
        400,
        "body_too_large",
        f"the callback body is larger than {limit} bytes; WeChat callbacks are much smaller",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(min(65536, limit + 1 - size))
        except web.HTTPRequestEntityTooLarge as e:
            raise too_big from e
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_big
    return b"".join(chunks)


def check_xml(body: bytes) -> str:
    """`body` as text if it may be handed to an XML parser; 400 ApiError otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_xml", "the body is not UTF-8 text") from e
    if _FORBIDDEN.search(body):
        raise ApiError(
            400,
            "invalid_xml",
            "the XML has a DOCTYPE, an entity declaration or a processing instruction; "
            "WeChat never sends those",
        )
    if not text.strip():
        raise ApiError(400, "invalid_xml", "the body is empty; expected a WeChat XML message")
    return text


def parse_xml(text: str) -> dict[str, Any]:
    """The <xml> element of a checked WeChat XML document as a dict."""
    try:
        doc = xmltodict.parse(text, disable_entities=True)
    except Exception as e:  # expat raises several kinds, xmltodict ValueError
        raise ApiError(400, "invalid_xml", f"the body is not well-formed XML: {e}") from e
    root = doc.get("xml") if isinstance(doc, dict) else None
    if not isinstance(root, dict):
        raise ApiError(400, "invalid_xml", "expected a document whose root element is <xml>")
    return root


def safe_xml(body: bytes) -> tuple[str, dict[str, Any]]:
    text = check_xml(body)
    return text, parse_xml(text)
