"""Continuing an answer that was cut after the shopper saw part of it.

The next model gets the visible text as its own (assistant) message and an instruction in
the conversation's language. Models rarely continue exactly: many start the answer again or
repeat the last sentence. `Splice` holds back the start of the continuation until it knows
how much of it repeats the visible text, and drops that part.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestration.language import pick
from orchestration.llm.types import ChatMessage

CONTINUE_PROMPT = (
    "Your previous reply was cut off. Continue it from exactly where it stopped, in the same "
    "language, without repeating anything."
)
CONTINUE_PROMPT_ZH = "你上一条回复被中断了。请从中断处继续，用同一种语言，不要重复已经说过的内容。"

_SENTENCE_END = re.compile(r"(?<=[.!?。！？\n])")
# A shorter repeat is taken as coincidence (a shared word), not as the model starting over.
MIN_OVERLAP = 6


def continuation_messages(
    messages: Sequence[ChatMessage], visible: str, question: str, mode: str = "instruction"
) -> list[ChatMessage]:
    """The original request, the visible text as the model's own words, and the
    instruction in the shopper's language (judged by the question, else the text). With a
    provider's prefix mode (`mode` "prefix" or "partial") the visible text ends the request,
    flagged, and the model writes on from it: no instruction, no restart to cut."""
    if mode in ("prefix", "partial"):
        return [*messages, ChatMessage("assistant", visible, continue_flag=mode)]
    basis = question or visible
    return [
        *messages,
        ChatMessage("assistant", visible),
        ChatMessage("user", pick(basis, CONTINUE_PROMPT, CONTINUE_PROMPT_ZH)),
    ]


def last_question(messages: Sequence[ChatMessage]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


class Splice:
    """Joins a continuation to the visible text without repeating any of it.

    `feed` returns what may be passed on now; `end` whatever was still held back. The part
    held back is at most as long as the visible text, and only while it could still turn
    out to be a repeat.
    """

    def __init__(self, visible: str) -> None:
        self.visible = visible
        self._held = ""
        self._decided = not visible

    def feed(self, delta: str) -> str:
        if self._decided:
            return delta
        self._held += delta
        if self._could_grow():
            return ""
        return self._release()

    def end(self) -> str:
        if self._decided:
            return ""
        return self._release()

    def _could_grow(self) -> bool:
        """Whether what is held occurs in the visible text before its end: then more of the
        continuation may show a longer repeat."""
        held, vis = self._held.lstrip(), self.visible.rstrip()
        return not held or held in vis[:-1]

    def _release(self) -> str:
        self._decided = True
        held, vis = self._held.lstrip(), self.visible.rstrip()
        # The longest end of the visible text that the continuation starts with: the model
        # repeated it (all of it when it started the answer again).
        for k in range(min(len(vis), len(held)), MIN_OVERLAP - 1, -1):
            if held.startswith(vis[-k:]):
                return held[k:]
        # However short, the unfinished last sentence said again is a repeat ("It" + "It
        # arrives...").
        fragment = _SENTENCE_END.split(vis)[-1].strip()
        if fragment and held.startswith(fragment):
            return held[len(fragment) :]
        return self._held
