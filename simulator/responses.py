"""The HTTP responses of a chat completion, in OpenAI's formats.

A streamed reply is SSE in OpenAI's chunk format, paced like a model: the first token after
the planned delay, then tokens at the planned rate, several tokens in one write when the rate
is fast (a stream writes at most about every 10 ms); tool calls stream as OpenAI streams them.
A non-streamed reply takes the same time and comes as one body. A planned cut drops the
connection half-way; every wait ends early when the client hangs up or the simulator stops.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from simulator.faults import Plan
from simulator.modes import Reply, SimToolCall, tool_calls_json
from simulator.state import SimState

# A stream writes at most once per this many seconds; faster token rates are batched.
_MIN_WRITE_GAP_S = 0.010
# Long waits check this often whether the client is still there.
_POLL_S = 0.2


def openai_error(
    status: int,
    message: str,
    err_type: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **more: Any,
) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": err_type, "param": None, "code": code}
    error.update(more)
    return web.json_response({"error": error}, status=status, headers=headers)


def close(request: web.Request) -> None:
    """Drop the connection mid-response, the way a crashing upstream does."""
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then FIN: an unfinished chunked body


async def wait_while_connected(request: web.Request, state: SimState, seconds: float) -> bool:
    """Sleep; False if the client hung up or the simulator is stopping meanwhile.

    Short waits are one plain sleep (the common case under load); long ones (slow and
    hung requests) wake up now and then, so an abandoned request ends soon after its
    client gave up instead of holding a task until the full delay is over.
    """
    if seconds <= _POLL_S:
        await asyncio.sleep(seconds)
        return not state.closing
    deadline = time.monotonic() + seconds
    while True:
        transport = request.transport
        if state.closing or transport is None or transport.is_closing():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, _POLL_S))


async def whole(
    request: web.Request,
    state: SimState,
    plan: Plan,
    tokens: tuple[str, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    finish_reason: str,
) -> web.StreamResponse:
    """A non-streamed completion: the same latency, the answer in one body."""
    message = {"role": "assistant", "content": "".join(tokens)}
    return await _whole(
        request, state, plan, message, len(tokens), model, reply_id, prompt_tokens, finish_reason
    )


async def _whole(
    request: web.Request,
    state: SimState,
    plan: Plan,
    message: dict[str, Any],
    n_tokens: int,
    model: str,
    reply_id: str,
    prompt_tokens: int,
    finish_reason: str,
) -> web.StreamResponse:
    """`message` in one chat.completion body, after the time `n_tokens` take to generate."""
    generation_s = n_tokens / plan.tokens_per_second if plan.tokens_per_second > 0 else 0
    if not await wait_while_connected(request, state, plan.first_token_s + generation_s):
        return web.Response(status=503)  # nobody is listening any more
    if plan.fault == "cut":
        close(request)
        return web.Response(status=502)  # never reaches the client
    state.stats.completed += 1
    state.stats.completion_tokens += n_tokens
    return web.json_response(
        {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_swarmdesk_sim",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(prompt_tokens, n_tokens),
        }
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What every chunk of one streamed reply shares; only the delta part changes."""

    reply_id: str
    model: str
    include_usage: bool

    @property
    def _created(self) -> str:
        return (
            f'data: {{"id":"{self.reply_id}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(self.model)},'
            f'"system_fingerprint":"fp_swarmdesk_sim","choices":'
        )

    def parts(self) -> tuple[str, str]:
        """(head, tail) of a chunk: a delta's JSON goes in between."""
        usage_null = ',"usage":null' if self.include_usage else ""
        head = f'{self._created}[{{"index":0,"delta":'
        return head, f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'

    def end(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> str:
        """The finish chunk, the usage chunk if asked for, and [DONE]."""
        head, tail = self.parts()
        out = [
            head + "{}" + tail.replace('"finish_reason":null', f'"finish_reason":"{finish_reason}"')
        ]
        if self.include_usage:
            usage = json.dumps(_usage(prompt_tokens, completion_tokens), separators=(",", ":"))
            out.append(f'{self._created}[],"usage":{usage}}}\n\n')
        out.append("data: [DONE]\n\n")
        return "".join(out)


async def stream(
    request: web.Request,
    state: SimState,
    plan: Plan,
    tokens: tuple[str, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    finish_reason: str,
    *,
    include_usage: bool,
) -> web.StreamResponse:
    """SSE in OpenAI's chunk format; several tokens share a chunk when the rate is high."""
    envelope = _Envelope(reply_id, model, include_usage)
    head, tail = envelope.parts()
    role_chunk = f'{head}{{"role":"assistant","content":""}}{tail}'

    def render(sent: int, upto: int) -> str:
        content = json.dumps("".join(tokens[sent:upto]), ensure_ascii=False)
        return (role_chunk if sent == 0 else "") + f'{head}{{"content":{content}}}{tail}'

    steps = len(tokens)
    if plan.fault == "cut":
        steps = len(tokens) // 2 if len(tokens) > 1 else 0
    return await _paced(request, state, plan, envelope, steps, render, finish_reason, prompt_tokens)


async def _paced(
    request: web.Request,
    state: SimState,
    plan: Plan,
    envelope: _Envelope,
    steps: int,
    render: Callable[[int, int], str],
    finish_reason: str,
    prompt_tokens: int,
) -> web.StreamResponse:
    """Stream `steps` steps (tokens, tool-call pieces) at the plan's pace: every step due by
    now goes out in one write of `render(first, end)`; then the end (or the planned cut)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    interval = 1 / plan.tokens_per_second if plan.tokens_per_second > 0 else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time() + plan.first_token_s
    sent = 0
    try:
        if not await wait_while_connected(request, state, plan.first_token_s):
            state.stats.disconnected += 1
            return response
        while sent < steps and not state.closing:
            due = steps if interval == 0 else int((loop.time() - start) / interval) + 1
            upto = min(steps, max(sent + 1, due))
            await response.write(render(sent, upto).encode())
            if sent == 0 and plan.tag is not None:
                state.record_timing(plan.tag, plan.arrived)
            state.stats.completion_tokens += upto - sent
            sent = upto
            if sent < steps:
                wait = start + sent * interval - loop.time()
                await asyncio.sleep(max(wait, _MIN_WRITE_GAP_S))

        if plan.fault == "cut" or state.closing:
            close(request)
            return response
        await response.write(envelope.end(finish_reason, prompt_tokens, sent).encode())
        state.stats.completed += 1
    except ConnectionError:
        state.stats.disconnected += 1  # the client gave up; nothing left to do
    return response


def _tool_call_deltas(
    calls: tuple[SimToolCall, ...], steps: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """Deltas for paced steps (call index, piece number; -1 is the call's header).

    Consecutive pieces of one call share a delta, as a provider batches them; a header
    opens each call with its index, id, type and name, like OpenAI's first chunk of a call.
    """
    deltas: list[dict[str, Any]] = []
    for index, piece in steps:
        call = calls[index]
        if piece < 0:
            entry = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            delta: dict[str, Any] = {"tool_calls": [entry]}
            if index == 0:
                delta = {"role": "assistant", "content": None, **delta}
            deltas.append(delta)
            continue
        last = deltas[-1]["tool_calls"][0] if deltas else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += call.pieces[piece]
        else:
            entry = {"index": index, "function": {"arguments": call.pieces[piece]}}
            deltas.append({"tool_calls": [entry]})
    return deltas


async def stream_tool_calls(
    request: web.Request,
    state: SimState,
    plan: Plan,
    calls: tuple[SimToolCall, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    *,
    include_usage: bool,
) -> web.StreamResponse:
    """Tool calls in OpenAI's streaming shape, paced like text: each call's header, then
    its arguments in pieces; finish_reason "tool_calls", then the usage chunk."""
    envelope = _Envelope(reply_id, model, include_usage)
    head, tail = envelope.parts()
    steps = [(i, p) for i, call in enumerate(calls) for p in range(-1, len(call.pieces))]

    def render(sent: int, upto: int) -> str:
        return "".join(
            f"{head}{json.dumps(d, ensure_ascii=False, separators=(',', ':'))}{tail}"
            for d in _tool_call_deltas(calls, steps[sent:upto])
        )

    count = len(steps) // 2 if plan.fault == "cut" else len(steps)
    return await _paced(request, state, plan, envelope, count, render, "tool_calls", prompt_tokens)


async def whole_tool_calls(
    request: web.Request,
    state: SimState,
    plan: Plan,
    reply: Reply,
    model: str,
    reply_id: str,
    prompt_tokens: int,
) -> web.StreamResponse:
    """Tool calls in a non-streamed completion, after the same latency as a stream."""
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": tool_calls_json(reply.calls),
        "refusal": None,
    }
    return await _whole(
        request,
        state,
        plan,
        message,
        reply.completion_tokens,
        model,
        reply_id,
        prompt_tokens,
        "tool_calls",
    )
