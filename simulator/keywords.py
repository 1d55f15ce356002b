"""Keyword lists compiled to one regex each, for the simulator's classifier and tool choice."""

from __future__ import annotations

import re


def keyword_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """Any of `words` in lower-cased text; ASCII words match whole words only, the others
    (CJK has no spaces) anywhere. Longer words first, so the longest one matches."""
    ascii_words = sorted((w for w in words if w.isascii()), key=len, reverse=True)
    other = sorted((w for w in words if not w.isascii()), key=len, reverse=True)
    parts = []
    if ascii_words:
        alternation = "|".join(map(re.escape, ascii_words))
        parts.append(rf"(?<![a-z0-9])(?:{alternation})(?![a-z0-9])")
    if other:
        parts.append("(?:" + "|".join(map(re.escape, other)) + ")")
    return re.compile("|".join(parts))
