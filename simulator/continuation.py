"""Requests to continue a reply that was cut, answered the way a good model answers them.

A continuation request is the original conversation, then the cut text as the assistant's
own message, then a short instruction to continue (in the shopper's language); or, in the
prefix mode some providers have, the conversation ending in that assistant message marked
`prefix` / `partial`. The simulator writes the reply it would have written to the original
request and sends what comes after the cut text, so a test or the demo sees one answer.
"""

from __future__ import annotations

from typing import Any

from simulator.keywords import keyword_pattern
from simulator.text import text_tokens

_CONTINUE = keyword_pattern(("continue", "继续"))
_CUT = keyword_pattern(("cut off", "interrupted", "stopped", "中断", "截断", "断了"))


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def split_continuation(raw: list[Any]) -> tuple[list[Any], str] | None:
    """(the original messages, the cut text) of a continuation request, else None."""
    if len(raw) < 2 or not all(isinstance(m, dict) for m in raw[-2:]):
        return None
    last = raw[-1]
    if last.get("role") == "assistant" and (last.get("prefix") or last.get("partial")):
        return raw[:-1], _content(last)
    before = raw[-2]
    if (
        len(raw) >= 3
        and last.get("role") == "user"
        and before.get("role") == "assistant"
        and not before.get("tool_calls")
        and _content(before)
    ):
        instruction = _content(last).lower()
        if _CONTINUE.search(instruction) and _CUT.search(instruction):
            return raw[:-2], _content(before)
    return None


def remainder(tokens: tuple[str, ...], visible: str) -> tuple[str, ...]:
    """What follows `visible` in the reply `tokens`; the whole reply when it does not begin
    with it (another model's text: this one starts over, as real models often do)."""
    joined = ""
    for i, token in enumerate(tokens):
        if joined == visible:
            return tokens[i:]
        joined += token
        if not visible.startswith(joined):
            break
    full = "".join(tokens)
    if full == visible:
        return ()
    if full.startswith(visible):
        return text_tokens(full[len(visible) :])
    return tokens
