"""Text rules of Telegram messages: length in UTF-16 units, splitting, and formatting.

Models write light Markdown (**bold**, `code`, [links](https://...)). Streamed text shows it
plain (markers removed); the final message carries it as HTML or MarkdownV2, rendered from
entities by aiogram's text decorations so every special character is escaped.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from aiogram.types import MessageEntity
from aiogram.utils.text_decorations import html_decoration, markdown_decoration

MAX_MESSAGE = 4096  # characters after entity parsing, counted in UTF-16 code units


def utf16_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int) -> int:
    """The longest prefix length (in code points) whose UTF-16 length is at most `limit`."""
    n = min(len(text), limit)
    while (excess := utf16_len(text[:n]) - limit) > 0:
        n -= (excess + 1) // 2
    return n


# Preferred cut points, best first; a cut must leave the chunk at least half full.
_PARAGRAPH = re.compile(r"\n\s*\n")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[.!?…])\s+|(?<=[。！？；])")
_SPACE = re.compile(r"\s+")


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Pieces of at most `limit` UTF-16 units, cut at paragraphs, else lines, else sentences,
    else words; never an empty piece (an all-blank text gives no pieces)."""
    chunks: list[str] = []
    rest = text.strip()
    while rest:
        if utf16_len(rest) <= limit:
            chunks.append(rest)
            break
        window = rest[: _fit(rest, limit)]
        cut = _cut_point(window)
        head, rest = window[:cut].rstrip(), rest[cut:].lstrip()
        if head:
            chunks.append(head)
    return chunks


def _cut_point(window: str) -> int:
    floor = len(window) // 2
    for pattern in (_PARAGRAPH, _LINE, _SENTENCE, _SPACE):
        best = -1
        for m in pattern.finditer(window):
            if m.start() >= floor:
                best = m.start() if m.end() > m.start() else m.end()
        if best > 0:
            return best
    return len(window)  # one endless word: cut it hard


# --- light Markdown -> plain text + entities ---------------------------------------------

_TOKEN = re.compile(
    r"```(?P<lang>[\w+-]*)\n?(?P<pre>.*?)```"
    r"|`(?P<code>[^`\n]+)`"
    r"|\*\*(?P<bold>\S(?:.*?\S)??)\*\*"
    r"|(?<!\w)__(?P<bold2>\S(?:.*?\S)??)__(?!\w)"
    r"|~~(?P<strike>\S(?:.*?\S)??)~~"
    r"|(?<![\w*])\*(?P<italic>[^*\s](?:[^*\n]*?[^*\s])??)\*(?![\w*])"
    r"|(?<![\w_])_(?P<italic2>[^_\s](?:[^_\n]*?[^_\s])??)_(?![\w_])"
    r"|\[(?P<label>[^\]\n]+)\]\((?P<url>https?://[^\s()]+)\)"
    r"|^(?P<hashes>\#{1,6})[ \t]+(?P<heading>[^\n]+)$",
    re.DOTALL | re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class Parsed:
    text: str
    entities: list[MessageEntity]


def parse_markdown(source: str) -> Parsed:
    """Plain text and the entities the light Markdown in `source` asks for. Unclosed or
    nested markers stay as they are: nothing is ever lost."""
    out: list[str] = []
    entities: list[MessageEntity] = []
    offset = 0  # UTF-16 length of `out` so far
    pos = 0

    def emit(part: str) -> int:
        nonlocal offset
        start = offset
        out.append(part)
        offset += utf16_len(part)
        return start

    for m in _TOKEN.finditer(source):
        if m.start() > pos:
            emit(source[pos : m.start()])
        pos = m.end()
        kind, value, extra = _token(m)
        if not value:
            emit(m.group(0))
            continue
        start = emit(value)
        length = offset - start
        entity = MessageEntity(type=kind, offset=start, length=length)
        if kind == "pre" and extra:
            entity = MessageEntity(type=kind, offset=start, length=length, language=extra)
        elif kind == "text_link":
            entity = MessageEntity(type=kind, offset=start, length=length, url=extra)
        entities.append(entity)
    if pos < len(source):
        emit(source[pos:])
    return Parsed("".join(out), entities)


def _token(m: re.Match[str]) -> tuple[str, str, str | None]:
    g = m.groupdict()
    if g["pre"] is not None:
        return "pre", g["pre"].rstrip("\n"), g["lang"] or None
    if g["code"] is not None:
        return "code", g["code"], None
    if g["bold"] is not None or g["bold2"] is not None:
        return "bold", g["bold"] or g["bold2"] or "", None
    if g["strike"] is not None:
        return "strikethrough", g["strike"], None
    if g["italic"] is not None or g["italic2"] is not None:
        return "italic", g["italic"] or g["italic2"] or "", None
    if g["label"] is not None:
        return "text_link", g["label"], g["url"]
    return "bold", g["heading"].strip(), None


def plain(source: str) -> str:
    """What a streamed draft shows: the text with complete Markdown markers removed."""
    if not any(c in source for c in "*_`~[#"):
        return source
    return parse_markdown(source).text


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    parse_mode: str | None
    formatted: bool  # False: the text carries no markup and equals its plain form


def render(source: str, parse_mode: str) -> Rendered:
    """The final message text for `parse_mode` (HTML, MarkdownV2 or none)."""
    if parse_mode == "none":
        return Rendered(source, None, False)
    parsed = parse_markdown(source)
    if not parsed.entities:
        return Rendered(parsed.text, None, False)  # nothing to format: no escaping needed
    if parse_mode == "HTML":
        # Telegram names a code block's language in a class attribute, not the one aiogram
        # writes: leave it out.
        ents = [
            _escaped_url(e, html.escape(e.url or "", quote=True)).model_copy(
                update={"language": None}
            )
            for e in parsed.entities
        ]
        return Rendered(html_decoration.unparse(parsed.text, ents), "HTML", True)
    if parse_mode == "MarkdownV2":
        ents = [_escaped_url(e, re.sub(r"([)\\])", r"\\\1", e.url or "")) for e in parsed.entities]
        return Rendered(markdown_decoration.unparse(parsed.text, ents), "MarkdownV2", True)
    raise ValueError(f"unknown parse mode {parse_mode!r}")


def _escaped_url(entity: MessageEntity, url: str) -> MessageEntity:
    # aiogram's decorations put the URL in as given; escape it for the target syntax.
    if entity.type != "text_link":
        return entity
    return entity.model_copy(update={"url": url})
