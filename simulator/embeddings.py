"""`POST /v1/embeddings` of the simulator: deterministic vectors, so the knowledge base's
embeddings path runs in tests and demos without a model.

A vector is the text's index terms (knowledge.tokenize, the same the lexical index uses)
hashed into a fixed number of dimensions with a sign each, then normalised: texts sharing
words point the same way, unrelated ones are near orthogonal. Nothing is learned, so it
finds nothing BM25 wouldn't; it only makes the fusion code run for real.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from aiohttp import web

from knowledge.tokenize import terms

DIMENSIONS = 256


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    vector = [0.0] * dimensions
    for term in terms(text):
        digest = hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest()
        n = int.from_bytes(digest, "big")
        vector[n % dimensions] += 1.0 if (n >> 32) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [round(x / norm, 6) for x in vector] if norm else vector


def _bad_request(message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error"}}, status=400
    )


async def embeddings(request: web.Request) -> web.Response:
    try:
        body: Any = await request.json()
    except ValueError:
        return _bad_request('the body must be JSON: {"model": ..., "input": [...]}')
    if not isinstance(body, dict):
        return _bad_request("the body must be a JSON object")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return _bad_request("'input' must be a string or a non-empty list of strings")
    vectors = [embed(t) for t in texts]
    tokens = sum(max(1, len(t) // 4) for t in texts)
    return web.json_response(
        {
            "object": "list",
            "model": str(body.get("model") or "sim-embed"),
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
