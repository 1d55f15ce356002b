"""Sections -> chunks: what one search hit returns. Short paragraphs under one heading are
merged up to about `chunk_chars`; a long paragraph is split at sentence ends (CJK ones too).
A chunk never spans two headings, so its heading path says what it is about."""

from __future__ import annotations

import re
from dataclasses import dataclass

from knowledge.sources import Section

# After a sentence end: Latin ones need a space after them (3.5 is not an end), CJK don't.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n+")


@dataclass(frozen=True, slots=True)
class Chunk:
    ordinal: int
    heading: str
    text: str
    title: str | None = None  # a catalogue product's own name
    url: str | None = None  # and its own page


def chunk_sections(sections: list[Section], chunk_chars: int = 600) -> list[Chunk]:
    chunks: list[Chunk] = []
    for section in sections:
        if section.whole:
            text = "\n".join(section.paragraphs).strip()
            chunks.append(Chunk(len(chunks), section.heading, text, section.title, section.url))
            continue
        for text in _merge(section.paragraphs, chunk_chars):
            chunks.append(Chunk(len(chunks), section.heading, text))
    return chunks


def _merge(paragraphs: list[str], limit: int) -> list[str]:
    pieces: list[str] = []
    for p in paragraphs:
        pieces.extend(_split_long(p.strip(), limit) if len(p) > limit else [p.strip()])
    out: list[str] = []
    current = ""
    for piece in pieces:
        if not piece:
            continue
        if current and len(current) + 2 + len(piece) > limit:
            out.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return out


def _split_long(paragraph: str, limit: int) -> list[str]:
    sentences = [s.strip() for s in _SENTENCE_END.split(paragraph) if s and s.strip()]
    out: list[str] = []
    current = ""
    for s in sentences:
        while len(s) > limit:  # one endless sentence: cut it where it must be cut
            if current:
                out.append(current)
                current = ""
            out.append(s[:limit])
            s = s[limit:]
        joiner = "" if _cjk_end(current) else " "
        if current and len(current) + len(joiner) + len(s) > limit:
            out.append(current)
            current = s
        else:
            current = f"{current}{joiner}{s}" if current else s
    if current:
        out.append(current)
    return out


def _cjk_end(text: str) -> bool:
    return bool(text) and text[-1] in "。！？；"
