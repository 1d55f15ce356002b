"""Streaming client for OpenAI-compatible chat completion endpoints.

One `ProviderClient` per provider keeps one pooled HTTP client, so every call to that
provider reuses warm keep-alive connections. A call is a `ChatStream`: an async iterator of
text deltas that measures itself into `CallStats` and turns every way a call can fail into
an `LLMError` with an `ErrorKind` the resilience layer can act on.

This runs on the hot path of every message, so the parser does no more than one
`json.loads` per SSE data line and no regexes.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

from orchestration.llm.tokens import estimate_messages_tokens, estimate_tokens
from orchestration.llm.types import CallStats, ChatMessage, ErrorKind, LLMError, Usage

# Error bodies are only read for their message; a misbehaving proxy must not make us
# buffer megabytes of HTML.
_MAX_ERROR_BODY = 16 * 1024
# How long to wait for the end of the body after `[DONE]` before giving the connection up.
_DRAIN_TIMEOUT_S = 1.0


class ProviderClient:
    """HTTP access to one OpenAI-compatible provider (DeepSeek, Kimi, OpenAI, vLLM, ...).

    `timeout_s` bounds every single network wait (a read, a write, waiting for a pooled
    connection), not the whole call: a healthy stream may run longer than that. The whole
    call is bounded by the caller's turn deadline, and the time to the first token by
    `first_token_timeout_s`.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 60,
        connect_timeout_s: float = 5,
        first_token_timeout_s: float = 30,
        max_concurrency: int = 32,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.first_token_timeout_s = first_token_timeout_s
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            # Provider URLs are configured explicitly; proxies from the environment would
            # silently route shoppers' conversations through a third party.
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ChatStream:
        """Start a streamed chat completion; nothing is sent until iteration begins.

        `extra` is merged into the request body last; a key set to None there is removed,
        e.g. `{"stream_options": None}` for a server that rejects that field.
        """
        payload: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        if extra:
            payload.update(extra)
            payload = {k: v for k, v in payload.items() if v is not None}
        return ChatStream(self, model, messages, payload)

    async def complete_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, CallStats]:
        """Run a streamed call to the end and return the whole text with its stats."""
        async with self.stream_chat(
            model, messages, max_tokens=max_tokens, temperature=temperature, extra=extra
        ) as stream:
            async for _ in stream:
                pass
        return stream.stats.text, stream.stats


class ChatStream:
    """Text deltas of one streamed chat completion.

    Use it as `async with client.stream_chat(...) as s: async for delta in s: ...`. Without
    `async with` it is safe as long as iteration runs to its end or fails; an abandoned
    iterator is closed by the event loop's async-generator finalizer as soon as the
    ChatStream is dropped.

    `stats` is updated while the stream runs; `stats.text`, `stats.total_s` and
    `stats.usage` are final once the stream has ended, failed or been closed. `text` is the
    text received so far at any moment.
    """

    def __init__(
        self,
        client: ProviderClient,
        model: str,
        messages: Sequence[ChatMessage],
        payload: dict[str, Any],
    ) -> None:
        # The generator references only the _Call, never this object: without a reference
        # cycle, dropping an abandoned ChatStream finalizes the generator (and frees its
        # pooled connection) at once instead of at the next cycle collection.
        self._call = _Call(client, model, messages, payload)
        self._gen: AsyncGenerator[str, None] = self._call.run()

    @property
    def stats(self) -> CallStats:
        return self._call.stats

    @property
    def text(self) -> str:
        return "".join(self._call.parts)

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop the call and release its connection; safe to call more than once."""
        await self._gen.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Call:
    """State and protocol logic of one call, driven by the `run()` generator."""

    def __init__(
        self,
        client: ProviderClient,
        model: str,
        messages: Sequence[ChatMessage],
        payload: dict[str, Any],
    ) -> None:
        self.stats = CallStats(model=model, provider=client.name)
        self.parts: list[str] = []
        self._client = client
        self._messages = messages
        self._payload = payload
        self._done = False  # saw `data: [DONE]`
        self._usage_reported = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def run(self) -> AsyncGenerator[str, None]:
        client = self._client
        stats = self.stats
        loop = asyncio.get_running_loop()
        stats.started_at = time.monotonic()
        first_token_deadline = loop.time() + client.first_token_timeout_s
        response: httpx.Response | None = None
        lines: AsyncIterator[str] | None = None
        accepted = False  # the provider answered 2xx, so it is (probably) billing us
        try:
            request = client._http.build_request("POST", "/chat/completions", json=self._payload)
            try:
                async with asyncio.timeout_at(first_token_deadline):
                    response = await client._http.send(request, stream=True)
                    if response.status_code >= 300:
                        raise await _status_error(response)
                    accepted = True
                    if _is_json(response):
                        # The server ignored `stream: true`; take the whole answer at once.
                        first = await self._read_whole(response)
                    else:
                        lines = response.aiter_lines()
                        first = await self._read_until_content(lines)
            except TimeoutError:
                raise LLMError(
                    ErrorKind.TIMEOUT,
                    f"no first token within {client.first_token_timeout_s:g}s",
                    partial_text=self.text,
                ) from None

            if first:
                stats.first_token_s = time.monotonic() - stats.started_at
                self.parts.append(first)
                yield first
            if lines is not None and not self._done:
                async for line in lines:
                    delta = self._feed(line)
                    if delta:
                        self.parts.append(delta)
                        yield delta
                    elif self._done:
                        break
            if self._done and lines is not None:
                await _drain(lines)
            if not self._done and stats.finish_reason is None:
                raise LLMError(
                    ErrorKind.STREAM_CUT,
                    "stream ended without [DONE] or finish_reason",
                    partial_text=self.text,
                )
        except httpx.TimeoutException as exc:
            raise LLMError(ErrorKind.TIMEOUT, _describe(exc), partial_text=self.text) from exc
        except httpx.TransportError as exc:
            # Once the provider accepted the call, a broken connection is a cut stream
            # (what was streamed may be kept); before that it is a connection problem.
            kind = ErrorKind.STREAM_CUT if accepted else ErrorKind.CONNECTION
            raise LLMError(kind, _describe(exc), partial_text=self.text) from exc
        finally:
            if lines is not None:
                await lines.aclose()  # type: ignore[attr-defined]
            if response is not None:
                await response.aclose()
            stats.total_s = time.monotonic() - stats.started_at
            stats.text = self.text
            if accepted and not self._usage_reported:
                stats.usage = Usage(
                    input_tokens=estimate_messages_tokens(self._messages),
                    output_tokens=estimate_tokens(stats.text),
                    estimated=True,
                )

    async def _read_until_content(self, lines: AsyncIterator[str]) -> str:
        """Consume lines up to the first non-empty content delta (or the end)."""
        async for line in lines:
            delta = self._feed(line)
            if delta:
                return delta
            if self._done:
                break
        return ""

    def _feed(self, line: str) -> str:
        """Apply one SSE line to the stats; return its content delta ('' if none)."""
        if not line.startswith("data:"):
            return ""  # blank separator, comment (": keep-alive"), event:/id: fields
        data = line[6:] if line.startswith("data: ") else line[5:].lstrip()
        if data.startswith("[DONE]"):
            self._done = True
            return ""
        try:
            chunk = json.loads(data)
        except ValueError:
            return ""  # tolerate junk a proxy may inject; [DONE]/EOF still decide the end
        if not isinstance(chunk, dict):
            return ""
        return self._apply_chunk(chunk, "delta")

    def _apply_chunk(self, chunk: dict[str, Any], key: str) -> str:
        """Take content, finish_reason and usage from one completion (chunk) object."""
        if "error" in chunk and not chunk.get("choices"):
            raise _in_band_error(chunk, self.text)
        usage = chunk.get("usage")
        if usage:
            self._take_usage(usage)
        choices = chunk.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        reason = choice.get("finish_reason")
        if reason:
            self.stats.finish_reason = reason
        body = choice.get(key)
        if not body:
            return ""
        content = body.get("content")
        return content if isinstance(content, str) else ""

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.stats.usage = Usage(input_tokens=prompt, output_tokens=completion)
            self._usage_reported = True

    async def _read_whole(self, response: httpx.Response) -> str:
        body = await response.aread()
        try:
            data = json.loads(body)
        except ValueError:
            raise LLMError(
                ErrorKind.SERVER, "invalid JSON in completion", status=response.status_code
            ) from None
        if not isinstance(data, dict):
            raise LLMError(ErrorKind.SERVER, "unexpected completion body")
        text = self._apply_chunk(data, "message")
        self._done = True
        return text


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows `[DONE]` (the end of the chunked body, normally already here).

    A response closed before its end cannot go back to the pool, so skipping this would
    cost a new TCP (and TLS) handshake per call. A server that keeps the body open after
    `[DONE]` only costs `_DRAIN_TIMEOUT_S` and that connection.
    """
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            async for _ in lines:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass


def _is_json(response: httpx.Response) -> bool:
    ctype: str = response.headers.get("content-type", "")
    return ctype.startswith("application/json")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _status_error(response: httpx.Response) -> LLMError:
    """Classify a non-2xx answer, with the provider's own message and retry hint."""
    status = response.status_code
    body = b""
    try:
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) >= _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass  # the status alone is enough to classify
    message, body_retry_after = _parse_error_body(body[:_MAX_ERROR_BODY])
    detail = f"HTTP {status}: {message}" if message else f"HTTP {status}"

    if status == 429:
        retry_after = _parse_retry_after(response.headers)
        if retry_after is None:
            retry_after = body_retry_after
        return LLMError(ErrorKind.RATE_LIMIT, detail, status=status, retry_after=retry_after)
    if status >= 500:
        return LLMError(ErrorKind.SERVER, detail, status=status)
    if status in (401, 402, 403):
        # 402 is how some providers (DeepSeek) say the account has no balance: like a bad
        # key, only a human can fix it.
        return LLMError(ErrorKind.AUTH, detail, status=status)
    if status == 408:
        return LLMError(ErrorKind.TIMEOUT, detail, status=status)
    if 400 <= status < 500:
        return LLMError(ErrorKind.BAD_REQUEST, detail, status=status)
    return LLMError(ErrorKind.SERVER, f"unexpected {detail}", status=status)


def _parse_error_body(body: bytes) -> tuple[str, float | None]:
    """(message, retry_after) from the usual error shapes; plain text as a fallback."""
    if not body:
        return "", None
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500], None
    if not isinstance(data, dict):
        return str(data)[:500], None
    err = data.get("error")
    message: Any = None
    retry: Any = data.get("retry_after")
    if isinstance(err, dict):
        message = err.get("message")
        retry = err.get("retry_after", retry)
        if not message:
            message = err.get("code") or err.get("type")
    elif isinstance(err, str):
        message = err
    if not message:
        message = data.get("message") or data.get("detail") or data.get("msg")
    return str(message or "")[:500], _to_seconds(retry)


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `Retry-After` (delta-seconds or HTTP date) or `retry-after-ms`."""
    ms = _to_seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _to_seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _to_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 and seconds == seconds else None  # reject NaN, < 0


def _in_band_error(chunk: dict[str, Any], partial_text: str) -> LLMError:
    """An error object sent inside a 200 stream (OpenAI and vLLM do this mid-stream)."""
    message, retry_after = _parse_error_body(json.dumps(chunk).encode())
    err = chunk.get("error")
    hint = ""
    if isinstance(err, dict):
        hint = f"{err.get('type', '')} {err.get('code', '')}".lower()
    if "rate" in hint or "429" in hint:
        return LLMError(
            ErrorKind.RATE_LIMIT,
            message,
            retry_after=retry_after,
            partial_text=partial_text,
        )
    return LLMError(ErrorKind.SERVER, f"error in stream: {message}", partial_text=partial_text)
