"""Cheap token estimates.

A real tokenizer (tiktoken) needs to download its vocabulary, which the service cannot rely
on, and exact counts are not needed: estimates only fill in usage when a provider did not
report it and decide how much history fits a prompt. The rule of thumb used here:

* a CJK ideograph, kana, hangul syllable or full-width symbol is about one token;
* everything else is about one token per 4 bytes of UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestration.llm.types import ChatMessage

# Per-message framing overhead (role, separators) that chat templates add.
MESSAGE_OVERHEAD_TOKENS = 4

# Characters that BPE vocabularies tend to encode as one token each.
_CJK_RE = re.compile(
    "["
    "\u1100-\u11ff"  # hangul jamo
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3130-\u318f"  # hangul compatibility jamo
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff00-\uffef"  # half-width and full-width forms
    "\U00020000-\U0002fa1f"  # CJK extensions B..F, compatibility supplement
    "]+"
)


def estimate_tokens(text: str) -> int:
    """Estimated token count of `text`; 0 only for the empty string."""
    if not text:
        return 0
    if text.isascii():  # the common case needs no scan at all
        return max(1, (len(text) + 3) // 4)
    runs = _CJK_RE.findall(text)
    if not runs:
        return max(1, (len(text.encode()) + 3) // 4)
    cjk = sum(len(run) for run in runs)
    rest = _CJK_RE.sub("", text)
    return max(1, cjk + (len(rest.encode()) + 3) // 4)


def estimate_messages_tokens(messages: Sequence[ChatMessage]) -> int:
    """Estimated prompt size of a chat request, framing overhead included."""
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def trim_history(messages: Sequence[ChatMessage], budget_tokens: int) -> list[ChatMessage]:
    """Fit a conversation into `budget_tokens`.

    Keeps the leading system message(s) and then as many of the newest messages as fit,
    without gaps, so the model never sees a reply without the question before it. The
    last message (the one being answered) and the system prompt are always kept, even
    when they alone exceed the budget: dropping them would change the task, not its size.
    """
    n_system = 0
    while n_system < len(messages) and messages[n_system].role == "system":
        n_system += 1
    head = list(messages[:n_system])
    rest = messages[n_system:]
    if not rest:
        return head

    used = estimate_messages_tokens(head)
    kept: list[ChatMessage] = []
    for i in range(len(rest) - 1, -1, -1):
        cost = estimate_tokens(rest[i].content) + MESSAGE_OVERHEAD_TOKENS
        if kept and used + cost > budget_tokens:
            break
        kept.append(rest[i])
        used += cost
    kept.reverse()
    return head + kept
