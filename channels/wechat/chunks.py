"""Sentence-aligned splitting of an answer into pieces of at most N bytes of UTF-8.

WeChat counts message length in bytes, not characters: 2,048 bytes are about 680 Chinese
characters. The pieces, joined, are exactly the input (nothing trimmed, nothing added), so a
shopper reading the messages in order reads the whole answer once.
"""

from __future__ import annotations

import re
import unicodedata

# A sentence ends after 。！？!?…; (and any closing quotes or brackets), after a '.' that is
# followed by a space, or at a line break; the whitespace after it belongs to it.
_SENTENCE_END = re.compile(r"(?:[。！？!?…；;]+[”’」』）)\]\"']*|\.+[”’」』）)\]\"']*(?=\s)|\n)\s*")
# Where a too-long sentence may be broken, best first: after a comma-like mark, at a space.
_SOFT_BREAKS = (re.compile(r"[，,、：:]\s*"), re.compile(r"\s+"))


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def sentences(text: str) -> list[str]:
    """The text cut after each sentence end; the last piece may be an unfinished sentence."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            out.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def complete_length(text: str) -> int:
    """How many characters of `text` are whole sentences (safe to send while streaming)."""
    end = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() < len(text):  # trailing whitespace may still grow; wait for more text
            end = m.end()
        elif not text[m.start() : m.end()].isspace():
            end = m.end()
    return end


def _prefix_fitting(text: str, limit: int) -> int:
    """The most characters of `text` whose UTF-8 fits in `limit` bytes, not cutting a
    character off the marks that belong to it (combining marks, ZWJ, variation selectors)."""
    size = 0
    n = 0
    for ch in text:
        b = utf8_len(ch)
        if size + b > limit:
            break
        size += b
        n += 1
    while 0 < n < len(text) and _joins_previous(text[n]):
        n -= 1
    return n if n > 0 else min(1, len(text))


def _joins_previous(ch: str) -> bool:
    return (
        unicodedata.combining(ch) > 0
        or ch in "\u200d\ufe0e\ufe0f"
        or "\U0001f3fb" <= ch <= "\U0001f3ff"  # skin tones
        or (ch >= "\U000e0020" and ch <= "\U000e007f")  # tag sequences
    )


def _break_long(piece: str, limit: int) -> list[str]:
    """A single sentence longer than `limit`: break at a comma, a space, or any character."""
    out: list[str] = []
    rest = piece
    while utf8_len(rest) > limit:
        fit = _prefix_fitting(rest, limit)
        cut = 0
        for pattern in _SOFT_BREAKS:
            ends = [m.end() for m in pattern.finditer(rest, 0, fit) if 0 < m.end() <= fit]
            # Only a break that keeps the piece reasonably full is worth it.
            ends = [e for e in ends if utf8_len(rest[:e]) * 2 >= limit]
            if ends:
                cut = ends[-1]
                break
        if cut == 0:
            cut = fit
        out.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        out.append(rest)
    return out


def split_text(text: str, limit: int = 2048) -> list[str]:
    """Pieces of at most `limit` UTF-8 bytes, cut at sentence ends where possible, as few as
    the sentences allow; `"".join(split_text(t)) == t`."""
    if limit < 4:
        raise ValueError("limit must hold at least one character (4 bytes)")
    if not text:
        return []
    chunks: list[str] = []
    current = ""
    size = 0
    for sentence in sentences(text):
        n = utf8_len(sentence)
        if size + n <= limit:
            current += sentence
            size += n
            continue
        if current:
            chunks.append(current)
        if n <= limit:
            current, size = sentence, n
            continue
        *full, last = _break_long(sentence, limit)
        chunks.extend(full)
        current, size = last, utf8_len(last)
    if current:
        chunks.append(current)
    return chunks
