"""Streaming client for OpenAI-compatible chat completion endpoints.

One `ProviderClient` per provider keeps one pooled HTTP client, so every call to that
provider reuses warm keep-alive connections. A call is a `ChatStream`: an async iterator of
text deltas that measures itself into `CallStats` and turns every way a call can fail into
an `LLMError` with an `ErrorKind` the resilience layer can act on.

This runs on the hot path of every message, so the parser does no more than one
`orjson.loads` per SSE data line (on the raw bytes, no decoding first) and no regexes, and
takes all the lines that have arrived at once. The
transport is aiohttp rather than httpx: measured against the simulator, httpx/httpcore
spent about 9 ms of CPU per 40-token stream at low concurrency and several times that
beyond ~64 concurrent streams (its pool bookkeeping is quadratic in the number of pooled
connections), where aiohttp spends about 2.3 ms and stays flat.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from orchestration.llm.tokens import estimate_messages_tokens, estimate_tokens
from orchestration.llm.types import CallStats, ChatMessage, ErrorKind, LLMError, ToolCall, Usage

# Error bodies are only read for their message; a misbehaving proxy must not make us
# buffer megabytes of HTML.
_MAX_ERROR_BODY = 16 * 1024
# How long to wait for the end of the body after `[DONE]` before giving the connection up.
_DRAIN_TIMEOUT_S = 1.0
# Read buffer per response; aiohttp accepts SSE lines up to twice this long.
_READ_BUFSIZE = 256 * 1024
# Longer SSE lines are a broken or hostile server, not a completion chunk.
_MAX_LINE = 2 * _READ_BUFSIZE


class ProviderClient:
    """HTTP access to one OpenAI-compatible provider (DeepSeek, Kimi, OpenAI, vLLM, ...).

    `timeout_s` bounds every single network wait (getting a pooled or new connection, the
    gap between two pieces of a stream), not the whole call: a healthy stream may run
    longer than that. The whole call is bounded by the caller's turn deadline, the time to
    the first token by `first_token_timeout_s`, and TCP connection setup by
    `connect_timeout_s`.
    `max_concurrency` caps the open connections, i.e. the calls in flight to this provider;
    more calls wait for a free connection.
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
        self.max_concurrency = max_concurrency
        self._url = URL(self.base_url + "/chat/completions")
        self._headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Up to the first token the call's deadline bounds every wait; after it a stream
        # that stops sending is found by the stall watch below, not by aiohttp's read
        # timeout, which re-arms a timer for every chunk of every stream.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeout_s,  # a free pooled connection, or a new one
            sock_connect=connect_timeout_s,
            sock_read=None,
        )
        self.stall_timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Streams being read: their body reader -> (bytes seen at the last look, since when).
        self._streaming: dict[aiohttp.StreamReader, tuple[int, float]] = {}
        self._stall_watch: asyncio.Task[None] | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop it will belong to, so building a
        # ProviderClient from configuration needs no event loop.
        if self._session is None:
            if self._closed:
                # An LLMError like any other failure, so a call racing shutdown degrades
                # to a fallback instead of crashing its caller.
                raise LLMError(ErrorKind.CONNECTION, f"provider client {self.name!r} is closed")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_concurrency, limit_per_host=0, ttl_dns_cache=300
                ),
                headers=self._headers,
                timeout=self._timeout,
                read_bufsize=_READ_BUFSIZE,
                # Provider URLs are configured explicitly; proxies from the environment
                # would silently route shoppers' conversations through a third party.
                trust_env=False,
            )
        return self._session

    def _watch(self, content: aiohttp.StreamReader) -> None:
        """Fail the stream with a timeout if no byte arrives for `stall_timeout_s`."""
        loop = asyncio.get_running_loop()
        self._streaming[content] = (content.total_bytes, loop.time())
        if self._stall_watch is None:
            self._stall_watch = loop.create_task(self._watch_stalls())

    def _unwatch(self, content: aiohttp.StreamReader) -> None:
        self._streaming.pop(content, None)

    async def _watch_stalls(self) -> None:
        loop = asyncio.get_running_loop()
        every = min(max(self.stall_timeout_s / 4, 0.02), 1.0)
        try:
            while self._streaming:
                await asyncio.sleep(every)
                now = loop.time()
                for content, (seen, since) in list(self._streaming.items()):
                    total = content.total_bytes
                    if total != seen:
                        self._streaming[content] = (total, now)
                    elif now - since >= self.stall_timeout_s:
                        del self._streaming[content]
                        # Raised by the reader's pending (or next) read.
                        content.set_exception(
                            aiohttp.ServerTimeoutError(
                                f"no data for {self.stall_timeout_s:g}s in the middle of a stream"
                            )
                        )
        finally:
            self._stall_watch = None

    async def aclose(self) -> None:
        self._closed = True
        if self._stall_watch is not None:
            self._stall_watch.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ChatStream:
        """Start a streamed chat completion; nothing is sent until iteration begins.

        `tools` are OpenAI function tools (`{"type": "function", "function": {...}}`); the
        calls the model makes are in `stats.tool_calls` once the stream has ended (the
        stream itself yields text only).
        `extra` is merged into the request body last; a key set to None there is removed,
        e.g. `{"stream_options": None}` for a server that rejects that field.
        """
        payload: dict[str, Any] = {
            "model": model,
            "messages": [m.to_openai() for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        if tools:
            payload["tools"] = list(tools)
        if tool_choice is not None:
            payload["tool_choice"] = tool_choice
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
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, CallStats]:
        """Run a streamed call to the end and return the whole text with its stats."""
        async with self.stream_chat(
            model,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            tools=tools,
            tool_choice=tool_choice,
            extra=extra,
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
        # Tool calls being streamed, by their index: (ids, names, argument pieces).
        self._tools: dict[int, tuple[list[str], list[str], list[str]]] = {}

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def run(self) -> AsyncGenerator[str, None]:
        client = self._client
        stats = self.stats
        loop = asyncio.get_running_loop()
        stats.started_at = time.monotonic()
        first_token_deadline = loop.time() + client.first_token_timeout_s
        response: aiohttp.ClientResponse | None = None
        accepted = False  # the provider answered 2xx, so it is (probably) billing us
        try:
            body = json.dumps(self._payload, ensure_ascii=False).encode()
            try:
                async with asyncio.timeout_at(first_token_deadline):
                    response = await client._get_session().post(client._url, data=body)
                    if response.status >= 300:
                        raise await _status_error(response)
                    accepted = True
                    if response.content_type == "application/json":
                        # The server ignored `stream: true`; take the whole answer at once.
                        first = await self._read_whole(response)
                    else:
                        first = await self._read_until_content(response.content)
            except aiohttp.ServerTimeoutError:
                raise  # a socket timeout of aiohttp's own, handled below
            except TimeoutError:
                raise LLMError(
                    ErrorKind.TIMEOUT,
                    f"no first token within {client.first_token_timeout_s:g}s",
                    partial_text=self.text,
                ) from None

            if first or self._tools:
                # A tool call's first delta is the model's first token as well.
                stats.first_token_s = time.monotonic() - stats.started_at
            if first:
                self.parts.append(first)
                yield first
            # Whatever has arrived is parsed in one go and handed on as one delta: a busy
            # loop that finds several chunks waiting passes them on with one wake-up of
            # each layer above instead of one per token.
            readany = response.content.readany
            rest = b""
            client._watch(response.content)
            while not self._done:
                data = await readany()
                if not data:
                    break  # end of body
                if rest:
                    data = rest + data
                lines = data.split(b"\n")
                rest = lines.pop()
                if len(rest) > _MAX_LINE:
                    raise ValueError(f"an SSE line longer than {_MAX_LINE} bytes")
                delta = self._feed_lines(lines)
                if delta:
                    self.parts.append(delta)
                    yield delta
            if rest and not self._done:
                delta = self._feed_lines([rest])  # a last line without its newline
                if delta:
                    self.parts.append(delta)
                    yield delta
            if self._done:
                await _drain(response.content)
            elif stats.finish_reason is None:
                raise LLMError(
                    ErrorKind.STREAM_CUT,
                    "stream ended without [DONE] or finish_reason",
                    partial_text=self.text,
                )
        except aiohttp.ServerTimeoutError as exc:
            raise LLMError(ErrorKind.TIMEOUT, _describe(exc), partial_text=self.text) from exc
        except aiohttp.ClientError as exc:
            # Once the provider accepted the call, a broken connection is a cut stream
            # (what was streamed may be kept); before that it is a connection problem.
            kind = ErrorKind.STREAM_CUT if accepted else ErrorKind.CONNECTION
            raise LLMError(kind, _describe(exc), partial_text=self.text) from exc
        except (HttpProcessingError, ValueError) as exc:  # an absurdly long SSE line
            raise LLMError(
                ErrorKind.SERVER, f"malformed stream: {_describe(exc)}", partial_text=self.text
            ) from exc
        finally:
            if response is not None:
                client._unwatch(response.content)
                # Back to the pool when the body was read to its end, closed otherwise.
                response.release()
            stats.total_s = time.monotonic() - stats.started_at
            stats.text = self.text
            if self._tools:
                stats.tool_calls = self._tool_calls()
            if accepted and not self._usage_reported:
                arguments = "".join(c.arguments_json for c in stats.tool_calls)
                stats.usage = Usage(
                    input_tokens=estimate_messages_tokens(self._messages),
                    output_tokens=estimate_tokens(stats.text) + estimate_tokens(arguments),
                    estimated=True,
                )

    async def _read_until_content(self, content: aiohttp.StreamReader) -> str:
        """Consume lines up to the first non-empty content delta (or the end)."""
        while not self._done:
            line = await content.readline()
            if not line:
                break
            delta = self._feed(line)
            if delta or self._tools:
                return delta
        return ""

    def _feed_lines(self, lines: list[bytes]) -> str:
        """Apply SSE lines (up to `[DONE]`); return their content deltas joined."""
        out = ""
        for line in lines:
            piece = self._feed(line)
            if piece:
                out += piece
            if self._done:
                break
        return out

    def _feed(self, line: bytes) -> str:
        """Apply one SSE line to the stats; return its content delta ('' if none)."""
        if not line.startswith(b"data:"):
            return ""  # blank separator, comment (": keep-alive"), event:/id: fields
        data = line[5:].lstrip()  # json.loads takes bytes and ignores the trailing newline
        if data.startswith(b"[DONE]"):
            self._done = True
            return ""
        try:
            chunk = orjson.loads(data)
        except ValueError:
            return ""  # tolerate junk a proxy may inject; [DONE]/EOF still decide the end
        if not isinstance(chunk, dict):
            return ""
        return self._apply_chunk(chunk, "delta")

    def _apply_chunk(self, chunk: dict[str, Any], key: str) -> str:
        """Take content, finish_reason and usage from one completion (chunk) object."""
        if chunk.get("error") and not chunk.get("choices"):
            raise _in_band_error(chunk, self.text)
        usage = chunk.get("usage")
        if usage:
            self._take_usage(usage)
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return ""
        choice = choices[0]
        if not isinstance(choice, dict):
            return ""
        reason = choice.get("finish_reason")
        if reason:
            self.stats.finish_reason = str(reason)
        body = choice.get(key)
        if not isinstance(body, dict):
            return ""
        calls = body.get("tool_calls")
        if calls:
            self._take_tool_calls(calls)
        content = body.get("content")
        return content if isinstance(content, str) else ""

    def _take_tool_calls(self, calls: Any) -> None:
        """Add one chunk's tool-call deltas (or a whole message's calls) to the calls so far.

        A call's first delta carries its index, id and name; later ones carry pieces of its
        arguments under the same index. A whole message's calls have no index: their
        position is theirs.
        """
        if not isinstance(calls, list):
            return
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            index = call.get("index", position)
            if not isinstance(index, int):
                continue
            ids, names, pieces = self._tools.setdefault(index, ([], [], []))
            if isinstance(call.get("id"), str) and call["id"]:
                ids.append(call["id"])
            fn = call.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str) and fn["name"]:
                    names.append(fn["name"])
                if isinstance(fn.get("arguments"), str):
                    pieces.append(fn["arguments"])

    def _tool_calls(self) -> list[ToolCall]:
        # Ids and names normally come once; a provider that repeats them in every delta
        # repeats the same value, so the first one is kept.
        return [
            ToolCall(
                id=ids[0] if ids else f"call_{index}",
                name=names[0] if names else "",
                arguments_json="".join(pieces),
            )
            for index, (ids, names, pieces) in sorted(self._tools.items())
        ]

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.stats.usage = Usage(input_tokens=prompt, output_tokens=completion)
            self._usage_reported = True

    async def _read_whole(self, response: aiohttp.ClientResponse) -> str:
        body = await response.read()
        try:
            data = json.loads(body)
        except ValueError:
            raise LLMError(
                ErrorKind.SERVER, "invalid JSON in completion", status=response.status
            ) from None
        if not isinstance(data, dict):
            raise LLMError(ErrorKind.SERVER, "unexpected completion body")
        text = self._apply_chunk(data, "message")
        self._done = True
        return text


async def _drain(content: aiohttp.StreamReader) -> None:
    """Read what follows `[DONE]` (the end of the chunked body, normally already here).

    A response released before its end cannot go back to the pool, so skipping this would
    cost a new TCP (and TLS) handshake per call. A server that keeps the body open after
    `[DONE]` only costs `_DRAIN_TIMEOUT_S` and that connection.
    """
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            while await content.read(65536):
                pass
    except (TimeoutError, aiohttp.ClientError, HttpProcessingError):
        pass


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _status_error(response: aiohttp.ClientResponse) -> LLMError:
    """Classify a non-2xx answer, with the provider's own message and retry hint."""
    status = response.status
    body = b""
    try:
        while len(body) < _MAX_ERROR_BODY:
            piece = await response.content.read(_MAX_ERROR_BODY - len(body))
            if not piece:
                break
            body += piece
    except (aiohttp.ClientError, HttpProcessingError):
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


def _parse_retry_after(headers: Mapping[str, str]) -> float | None:
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
