"""`POST /v1/chat/completions`: the request checked, its plan made, its reply chosen.

The reply is the planned fault (429, 500, a hang), else tool calls, an answer from tool
results or JSON (simulator.modes), else the canned reply (simulator.text), sent by
simulator.responses streamed or whole.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from orchestration.llm.tokens import estimate_messages_tokens
from orchestration.llm.types import ChatMessage
from simulator import modes
from simulator.continuation import remainder, split_continuation
from simulator.faults import parse_directives
from simulator.knowledge_answers import read_documents
from simulator.parts import own_part, policy_answer
from simulator.responses import (
    openai_error,
    stream,
    stream_tool_calls,
    wait_while_connected,
    whole,
    whole_tool_calls,
)
from simulator.state import STATE
from simulator.text import reply_tokens, text_tokens

# A hung request gives up on its own after this long, so nothing lingers forever.
_HANG_MAX_S = 600.0


def _content_text(content: Any) -> str:
    """Message content as text; list content (text + image parts) keeps its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _parse_messages(body: Any) -> list[ChatMessage] | str:
    """The request's messages, or what is wrong with the request."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        return "'messages' must be a non-empty array."
    messages: list[ChatMessage] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            return "Each message must be an object with a 'role'."
        messages.append(ChatMessage(item["role"], _content_text(item.get("content"))))
    return messages


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrived = time.perf_counter()
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return openai_error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error"
        )
    messages = _parse_messages(body)
    if isinstance(messages, str):
        return openai_error(400, messages, "invalid_request_error")
    problem = modes.check_request(body)
    if problem is not None:
        return openai_error(400, problem, "invalid_request_error")

    # A request to continue a cut reply is answered from the original request.
    visible = ""
    continued = split_continuation(body["messages"])
    prefixed = continued is not None and body["messages"][-1].get("role") == "assistant"
    if continued is not None:
        body = {**body, "messages": continued[0]}
        messages, visible = messages[: len(continued[0])], continued[1]

    stats = state.stats
    stats.requests += 1
    stats.continuations += continued is not None
    stats.prefix_continuations += prefixed
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    directives, question = parse_directives(last_user)
    # A specialist of a multi-part message answers its own part (simulator.parts).
    system = next((m.content for m in messages if m.role == "system"), "")
    question, part_intents = own_part(system, question)
    plan = state.plan(directives)
    plan.arrived = arrived

    if plan.fault == "429":
        wait = _seconds_header(plan.retry_after)
        return openai_error(
            429,
            f"Rate limit reached for requests (simulated). Please try again in {wait}s.",
            "requests",
            "rate_limit_exceeded",
            headers={"Retry-After": wait},
            retry_after=plan.retry_after,
        )
    if plan.fault == "500":
        return openai_error(
            500,
            "The server had an error while processing your request (simulated).",
            "server_error",
        )

    stats.active += 1
    stats.peak_active = max(stats.peak_active, stats.active)
    try:
        if plan.fault == "hang":
            # Say nothing until the client gives up (or the simulator stops).
            await wait_while_connected(request, state, _HANG_MAX_S)
            return web.Response(status=504)  # only reached on shutdown or after _HANG_MAX_S

        n_tokens = plan.reply_tokens
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        reply_number = next(state.ids)
        # Tool calls, an answer from tool results or JSON; else the canned reply.
        # (with the shop's documents in the prompt, they say what the policy is)
        policy = (
            policy_answer(question, part_intents)
            if messages[-1].role == "user" and not read_documents(body["messages"]).present
            else None
        )
        special = (
            modes.Reply(tokens=text_tokens(policy))
            if policy is not None
            else modes.special_reply(body, question, f"call_sim{reply_number}")
        )
        if special is None:
            if isinstance(limit, int) and 0 < limit < n_tokens:
                n_tokens, finish_reason = limit, "length"
            tokens = reply_tokens(" ".join(question.split()), n_tokens, state.config.seed)
        else:
            tokens = special.tokens
            if isinstance(limit, int) and 0 < limit < len(tokens):
                tokens, finish_reason = tokens[:limit], "length"
        if visible:
            tokens = remainder(tokens, visible)
        prompt_tokens = estimate_messages_tokens(messages) + modes.prompt_overhead(body)
        stats.prompt_tokens += prompt_tokens
        model = str(body.get("model") or "simulator")
        reply_id = f"chatcmpl-sim{reply_number}"
        if special is not None and special.calls:
            if body.get("stream"):
                options = body.get("stream_options")
                return await stream_tool_calls(
                    request,
                    state,
                    plan,
                    special.calls,
                    model,
                    reply_id,
                    prompt_tokens,
                    include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
                )
            return await whole_tool_calls(
                request, state, plan, special, model, reply_id, prompt_tokens
            )

        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await stream(
                request,
                state,
                plan,
                tokens,
                model,
                reply_id,
                prompt_tokens,
                finish_reason,
                include_usage=include_usage,
            )
        return await whole(
            request, state, plan, tokens, model, reply_id, prompt_tokens, finish_reason
        )
    finally:
        stats.active -= 1


def _seconds_header(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
