"""A tiny OpenAI-compatible model that answers every chat completion with a fixed text.

For the routing tests: whatever JSON (or non-JSON) the test wants the classifier model to
say, or an HTTP error status. Requests are recorded (`requests`) for assertions.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class JsonModel:
    def __init__(self, answer: str = "{}", *, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "fake failure", "type": "server_error"}}, status=self.status
            )
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": body.get("model"),
            "choices": [{"index": 0, "delta": {"content": self.answer}, "finish_reason": None}],
        }
        end = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": body.get("model"),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in (chunk, end):
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
