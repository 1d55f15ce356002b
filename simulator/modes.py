"""Replies of the simulator beyond canned text: tool calls, answers from tool results, JSON.

- A request offering `tools` whose last message is the shopper's gets the tool calls a
  model would make (tool_choice), or a question for the id it needs, or plain text.
- A request ending in `tool` messages gets an answer written from those results
  (tool_answers).
- `response_format: {"type": "json_object"}` gets a classification of the last user
  message (classify).

`check_request` rejects malformed tool traffic the way OpenAI does, so a client that builds
tool messages wrongly fails in tests instead of in production.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from orchestration.llm.tokens import estimate_tokens
from orchestration.shop_knowledge import SEARCH_KNOWLEDGE
from simulator.classify import classify
from simulator.knowledge_answers import knowledge_reply
from simulator.text import text_tokens
from simulator.tool_answers import answer_from_results, ask_for
from simulator.tool_choice import PlannedCall, choose, tool_function

# Argument JSON streams in pieces of about this many characters (a token or two).
_ARGUMENT_PIECE = 4


@dataclass(frozen=True, slots=True)
class SimToolCall:
    id: str
    name: str
    arguments: str  # JSON text
    pieces: tuple[str, ...]  # `arguments` as streamed


@dataclass(frozen=True, slots=True)
class Reply:
    """Text tokens, or tool calls (then `tokens` is empty)."""

    tokens: tuple[str, ...] = ()
    calls: tuple[SimToolCall, ...] = ()

    @property
    def completion_tokens(self) -> int:
        # A call costs its name (about one token) plus its argument pieces.
        return len(self.tokens) + sum(1 + len(c.pieces) for c in self.calls)


def check_request(body: dict[str, Any]) -> str | None:
    """What is wrong with the request's tools and tool messages, or None."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "Invalid type for 'tools': expected an array of function tools."
        for i, item in enumerate(tools):
            if tool_function(item) is None:
                return (
                    f"Invalid 'tools[{i}]': expected "
                    '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
                )
    known_ids: set[str] = set()
    for i, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls is not None:
            if not isinstance(calls, list):
                return f"Invalid type for 'messages[{i}].tool_calls': expected an array."
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if (
                    not isinstance(call, dict)
                    or not isinstance(call.get("id"), str)
                    or not isinstance(fn, dict)
                    or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments"), str)
                ):
                    return (
                        f"Invalid 'messages[{i}].tool_calls[{j}]': expected "
                        '{"id": ..., "type": "function", "function": {"name": ..., '
                        '"arguments": "<JSON text>"}}.'
                    )
                known_ids.add(call["id"])
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in known_ids:
                return (
                    f"Invalid parameter: 'messages[{i}]' with role 'tool' must be a response "
                    "to a preceding message with 'tool_calls' (its 'tool_call_id' must match "
                    "one of their ids)."
                )
    return None


def prompt_overhead(body: dict[str, Any]) -> int:
    """Prompt tokens the tool definitions and earlier tool calls add (providers bill them)."""
    extra = 0
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        extra += _tokens_of(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            extra += estimate_tokens(json.dumps(message["tool_calls"], ensure_ascii=False))
    return extra


@functools.lru_cache(maxsize=256)
def _tokens_of(tools_json: str) -> int:
    # Every request of a specialist carries the same tool definitions.
    return estimate_tokens(tools_json)


def special_reply(body: dict[str, Any], question: str, call_prefix: str) -> Reply | None:
    """The reply for a JSON-mode or tool request; None for an ordinary chat request."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        verdict = json.dumps(classify(question), ensure_ascii=False)
        return Reply(tokens=text_tokens(verdict))

    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    composed = _compose_findings(question)
    if composed:
        return Reply(tokens=text_tokens(composed))
    tools = body.get("tools")
    functions = [
        fn for fn in map(tool_function, tools if isinstance(tools, list) else []) if fn is not None
    ]
    # The shop's documents answer questions about its rules (simulator.knowledge_answers).
    known = knowledge_reply(body, question, functions)
    if isinstance(known, str):
        return Reply(tokens=text_tokens(known))
    if known is not None:
        return Reply(calls=(_sim_call(f"{call_prefix}_0", known),))
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.append(_text(message.get("content")))
    if results:
        results.reverse()
        return Reply(tokens=text_tokens(answer_from_results(results, question)))

    if not functions or not messages:
        return None
    if messages[-1].get("role") != "user":
        return None
    decision = choose(
        # (the documents are searched by the rule above, never as a lookup tool)
        [fn for fn in functions if fn.get("name") != SEARCH_KNOWLEDGE],
        question,
        tool_choice=body.get("tool_choice"),
        parallel=body.get("parallel_tool_calls") is not False,
    )
    if decision.calls:
        return Reply(
            calls=tuple(_sim_call(f"{call_prefix}_{i}", c) for i, c in enumerate(decision.calls))
        )
    if decision.wanted:
        return Reply(tokens=text_tokens(ask_for(decision.wanted, question)))
    return None


def _compose_findings(prompt: str) -> str | None:
    """An aggregation request (the orchestrator's "Findings:" block, one "[specialist]"
    header per finding): join what the specialists found, as a model would, so a
    multi-intent answer keeps their facts."""
    _, marker, findings = prompt.partition("\nFindings:\n")
    if not marker:
        return None
    parts: list[str] = []
    for block in findings.split("\n\n"):
        head, _, body = block.strip().partition("\n")
        if head.startswith("[") and body.strip():
            parts.append(body.strip())
    return " ".join(parts) or None


def _sim_call(call_id: str, call: PlannedCall) -> SimToolCall:
    arguments = call.arguments_json()
    pieces = tuple(
        arguments[i : i + _ARGUMENT_PIECE] for i in range(0, len(arguments), _ARGUMENT_PIECE)
    )
    return SimToolCall(call_id, call.name, arguments, pieces)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def tool_calls_json(calls: tuple[SimToolCall, ...]) -> list[dict[str, Any]]:
    """The calls as in a non-streamed completion's message."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]
