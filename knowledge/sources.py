"""Read one shop document (Markdown, text, HTML, PDF, or a product catalogue as CSV/JSON)
into a title, the link a shopper may open, and its sections (heading path, text).

Every refusal is a KnowledgeError that says what to do, raised before anything is stored.
The file's size is checked before it is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from knowledge.errors import KnowledgeError

HEADING_SEP = " › "

KINDS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".csv": "catalogue",
    ".json": "catalogue",
}
SUPPORTED = ", ".join(sorted(KINDS))


@dataclass(frozen=True, slots=True)
class Section:
    """A run of text under one heading path. `paragraphs` are the chunker's units; `whole`
    sections (a catalogue's product) become exactly one chunk with their own title/url."""

    heading: str
    paragraphs: list[str]
    whole: bool = False
    title: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # the absolute path it was read from
    kind: str
    title: str
    url: str | None
    sha256: str
    size_bytes: int
    sections: list[Section] = field(default_factory=list)


def local_path(path_or_url: str | os.PathLike[str]) -> Path:
    """A path or a `file://` URL of a local file -> its absolute path."""
    text = os.fspath(path_or_url)
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme != "file":
            raise KnowledgeError(
                f"{text}: only local files are read; download it and add the file, "
                "or give a path or a file:// URL"
            )
        if parsed.netloc not in ("", "localhost"):
            raise KnowledgeError(f"{text}: a file:// URL must name a file on this machine")
        text = unquote(parsed.path)
    return Path(text).expanduser().absolute()


def kind_of(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise KnowledgeError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'; supported: {SUPPORTED}"
        )
    return kind


def fingerprint(path_or_url: str | os.PathLike[str], *, max_file_mb: float = 20) -> tuple[str, str]:
    """(absolute path, sha256 of the content): enough to tell that a file hasn't changed
    without parsing it. The same refusals as `read_document` for a missing, unsupported,
    empty or oversized file."""
    path, _kind, _size = _checked(path_or_url, max_file_mb)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise KnowledgeError(f"{path}: can't read it ({e.strerror}); check its permissions") from e
    return str(path), digest.hexdigest()


def _checked(path_or_url: str | os.PathLike[str], max_file_mb: float) -> tuple[Path, str, int]:
    path = local_path(path_or_url)
    kind = kind_of(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise KnowledgeError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise KnowledgeError(f"{path}: can't read it ({e.strerror}); check its permissions") from e
    if not path.is_file():
        raise KnowledgeError(f"{path}: not a file; add the files inside a folder one by one")
    limit = int(max_file_mb * 1024 * 1024)
    if size > limit:
        raise KnowledgeError(
            f"{path}: {size / 1024 / 1024:.0f} MB is over the {max_file_mb:g} MB limit; split "
            "the document, or raise knowledge.max_file_mb"
        )
    if size == 0:
        raise KnowledgeError(f"{path}: the file is empty; add a file with text in it")
    return path, kind, size


def read_document(
    path_or_url: str | os.PathLike[str],
    *,
    max_file_mb: float = 20,
    url: str | None = None,
    url_prefix: str | None = None,
) -> Document:
    """Read and parse one file. `url` overrides the link found in the file; else the file's
    own (front matter, canonical link), else `url_prefix` + the file's stem, else None."""
    path, kind, size = _checked(path_or_url, max_file_mb)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KnowledgeError(f"{path}: can't read it ({e.strerror}); check its permissions") from e
    sha = hashlib.sha256(data).hexdigest()

    if kind == "pdf":
        title, found_url, sections = _pdf(path, data)
    else:
        text = _decode(path, data)
        if kind == "markdown":
            title, found_url, sections = _markdown(path, text)
        elif kind == "html":
            title, found_url, sections = _html(path, text)
        elif kind == "text":
            title, found_url, sections = _plain(path, text)
        else:
            title, found_url, sections = _catalogue(path, text)
    sections = [s for s in sections if any(p.strip() for p in s.paragraphs)]
    if not sections:
        raise KnowledgeError(f"{path}: no text found in it; add a document with text")
    link = url or found_url or (_join_url(url_prefix, path.stem) if url_prefix else None)
    return Document(str(path), kind, title, link, sha, size, sections)


def _join_url(prefix: str, stem: str) -> str:
    return f"{prefix.rstrip('/')}/{stem}"


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data:
        raise KnowledgeError(
            f"{path}: binary content in a {path.suffix} file; add the document as text "
            "(or as a PDF if it is one)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KnowledgeError(f"{path}: not UTF-8 text; save it as UTF-8 and add it again") from None
    if not text.strip():
        raise KnowledgeError(f"{path}: the file has only blank space; add a file with text in it")
    return text


def _title_from_stem(path: Path) -> str:
    return re.sub(r"[-_]+", " ", path.stem).strip().capitalize() or path.name


def _squash(text: str) -> str:
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


class _Outline:
    """Collects paragraphs under the current heading path."""

    def __init__(self, title_heading: str | None = None) -> None:
        self.sections: list[Section] = []
        self.path: list[tuple[int, str]] = []
        self.paragraphs: list[str] = []
        self._title_heading = title_heading

    def heading(self, level: int, text: str) -> None:
        self.flush()
        text = _squash(text)
        self.path = [(lvl, t) for lvl, t in self.path if lvl < level]
        if not (level == 1 and text == self._title_heading):
            self.path.append((level, text))

    def paragraph(self, text: str) -> None:
        text = "\n".join(_squash(line) for line in text.splitlines() if line.strip())
        if text:
            self.paragraphs.append(text)

    def flush(self) -> None:
        if self.paragraphs:
            heading = HEADING_SEP.join(t for _, t in self.path if t)
            self.sections.append(Section(heading, self.paragraphs))
            self.paragraphs = []


# --- Markdown ------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)


def _front_matter(path: Path, text: str) -> tuple[dict[str, Any], str]:
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        raise KnowledgeError(
            f"{path}: the front matter between the '---' lines is not valid YAML; "
            "write it as 'title: ...' and 'url: ...' lines"
        ) from None
    return (meta if isinstance(meta, dict) else {}), text[m.end() :]


def _inline_text(token: Any) -> str:
    parts: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline", "html_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif child.type == "image":
            parts.append(child.content)
    return "".join(parts)


def _markdown(path: Path, text: str) -> tuple[str, str | None, list[Section]]:
    from markdown_it import MarkdownIt

    meta, body = _front_matter(path, text)
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    first_h1 = next(
        (
            _inline_text(tokens[i + 1])
            for i, t in enumerate(tokens)
            if t.type == "heading_open" and t.tag == "h1" and i + 1 < len(tokens)
        ),
        None,
    )
    title = str(meta.get("title") or first_h1 or _title_from_stem(path)).strip()
    outline = _Outline(title_heading=_squash(first_h1) if first_h1 else None)
    list_depth = 0
    in_cell = False
    row: list[str] = []
    rows: list[str] = []
    items: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.type == "heading_open":
            outline.heading(int(t.tag[1]), _inline_text(tokens[i + 1]))
            i += 3
            continue
        if t.type in ("bullet_list_open", "ordered_list_open"):
            list_depth += 1
        elif t.type in ("bullet_list_close", "ordered_list_close"):
            list_depth -= 1
            if list_depth == 0 and items:
                outline.paragraph("\n".join(items))  # a list stays one paragraph
                items = []
        elif t.type == "inline":
            content = _inline_text(t)
            if in_cell:
                row.append(_squash(content))
            elif list_depth:
                items.append("- " + content)
            else:
                outline.paragraph(content)
        elif t.type in ("th_open", "td_open"):
            in_cell = True
        elif t.type in ("th_close", "td_close"):
            in_cell = False
        elif t.type == "tr_close":
            rows.append(" | ".join(row))
            row = []
        elif t.type == "table_close":
            outline.paragraph("\n".join(rows))
            rows = []
        elif t.type in ("fence", "code_block"):
            outline.paragraph(t.content)
        i += 1
    outline.flush()
    url = meta.get("url")
    return title, (str(url) if url else None), outline.sections


# --- plain text ----------------------------------------------------------------------------


def _plain(path: Path, text: str) -> tuple[str, str | None, list[Section]]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    title = _title_from_stem(path)
    first = paragraphs[0] if paragraphs else ""
    # A short first line with no sentence end reads as the document's title.
    if first and "\n" not in first and len(first) <= 80 and not re.search(r"[.!?。！？]$", first):
        title = first
        paragraphs = paragraphs[1:] or paragraphs
    outline = _Outline()
    for p in paragraphs:
        outline.paragraph(p)
    outline.flush()
    return title, None, outline.sections


# --- HTML ----------------------------------------------------------------------------------

_DROP = {
    "script",
    "style",
    "nav",
    "footer",
    "noscript",
    "template",
    "head",
    "svg",
    "form",
    "iframe",
}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_PARAGRAPHS = {"p", "li", "pre", "blockquote", "dt", "dd", "figcaption", "caption", "address"}
_CONTAINERS = {
    "html", "body", "main", "article", "section", "div", "header", "aside", "ul", "ol", "dl",
    "table", "thead", "tbody", "tfoot", "figure", "details", "summary", "center",
}  # fmt: skip


def _html(path: Path, text: str) -> tuple[str, str | None, list[Section]]:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(text)
    h1 = tree.css_first("h1")
    title_node = tree.css_first("title")
    og_title = tree.css_first('meta[property="og:title"]')
    # The page's own name first: <title> often carries the site's name too ("… | Shop").
    title = (
        (str(og_title.attributes.get("content") or "") if og_title else "")
        or (h1.text(separator=" ", strip=True) if h1 else "")
        or (title_node.text(strip=True) if title_node else "")
        or _title_from_stem(path)
    )
    url: str | None = None
    canonical = tree.css_first('link[rel="canonical"]')
    if canonical is not None and canonical.attributes.get("href"):
        url = str(canonical.attributes["href"])
    else:
        og_url = tree.css_first('meta[property="og:url"]')
        if og_url is not None and og_url.attributes.get("content"):
            url = str(og_url.attributes["content"])
    outline = _Outline(title_heading=_squash(h1.text()) if h1 else None)
    root = tree.body or tree.root
    if root is not None:
        _walk(root, outline)
    outline.flush()
    return _squash(title), url, outline.sections


def _walk(node: Any, outline: _Outline) -> None:
    buffer: list[str] = []

    def flush() -> None:
        if buffer:
            outline.paragraph(" ".join(buffer))
            buffer.clear()

    for child in node.iter(include_text=True):
        tag = child.tag
        if tag == "-text":
            buffer.append(child.text(deep=False))
        elif tag in _DROP or tag == "-comment":
            continue
        elif tag in _HEADINGS:
            flush()
            outline.heading(int(tag[1]), child.text(separator=" "))
        elif tag == "tr":
            flush()
            cells = [c.text(separator=" ", strip=True) for c in child.css("th, td")]
            outline.paragraph(" | ".join(c for c in cells if c))
        elif tag in ("ul", "ol") and _flat_list(child):
            flush()
            items = [li.text(separator=" ") for li in child.iter() if li.tag == "li"]
            outline.paragraph("\n".join(f"- {_squash(i)}" for i in items if i.strip()))
        elif tag in _PARAGRAPHS:
            flush()
            outline.paragraph(child.text(separator=" "))
        elif tag in _CONTAINERS:
            flush()
            _walk(child, outline)
        elif tag == "br":
            buffer.append("\n")
        else:
            buffer.append(child.text(separator=" "))
    flush()


def _flat_list(node: Any) -> bool:
    """A list whose items hold no blocks of their own: it stays one paragraph."""
    for li in node.iter():
        if li.tag != "li":
            return False
        if any(c.tag in _CONTAINERS or c.tag in _PARAGRAPHS for c in li.iter()):
            return False
    return True


# --- PDF -----------------------------------------------------------------------------------


def _pdf(path: Path, data: bytes) -> tuple[str, str | None, list[Section]]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise KnowledgeError(
                f"{path}: the PDF is password-protected; save an unprotected copy and add that"
            )
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata else None
    except KnowledgeError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AssertionError) as e:
        raise KnowledgeError(
            f"{path}: not a readable PDF ({type(e).__name__}: {e}); re-export or repair it "
            "and add it again"
        ) from None
    if not any(p.strip() for p in pages):
        raise KnowledgeError(
            f"{path}: the PDF has no text layer — scanned? export it with text or OCR it first"
        )
    title = str(meta_title).strip() if meta_title and str(meta_title).strip() else ""
    if not title:
        first_line = next((ln.strip() for ln in pages[0].splitlines() if ln.strip()), "")
        title = first_line if 0 < len(first_line) <= 80 else _title_from_stem(path)
    outline = _Outline()
    many = len(pages) > 1
    for n, page in enumerate(pages, start=1):
        if many:
            outline.heading(2, f"Page {n}")
        for para in re.split(r"\n\s*\n", page):
            outline.paragraph(para)
    outline.flush()
    return title, None, outline.sections


# --- product catalogue ---------------------------------------------------------------------

_NAME_KEYS = ("name", "title", "product_name", "product", "名称", "商品名称")
_SKU_KEYS = ("sku", "id", "code", "product_id", "item_id", "编号")
_URL_KEYS = ("url", "link", "product_url", "page")


def _catalogue(path: Path, text: str) -> tuple[str, str | None, list[Section]]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KnowledgeError(
                f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); a "
                'catalogue is a list of products: [{"sku": ..., "name": ..., ...}]'
            ) from None
        if isinstance(data, dict):
            data = data.get("products", data.get("items"))
        if not isinstance(data, list) or not all(isinstance(p, dict) for p in data):
            raise KnowledgeError(
                f"{path}: a JSON catalogue is a list of products (objects), or "
                '{"products": [...]}; each product an object with its fields'
            )
        products: list[dict[str, Any]] = data
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise KnowledgeError(f"{path}: a CSV catalogue needs a header row (sku,name,...)")
        products = [dict(row) for row in reader]
    sections: list[Section] = []
    for n, product in enumerate(products, start=1):
        fields = {
            str(k).strip(): v
            for k, v in product.items()
            if k is not None and v not in (None, "", [], {})
        }
        if not fields:
            continue
        lower = {k.lower(): k for k in fields}
        name = next((str(fields[lower[k]]) for k in _NAME_KEYS if k in lower), None)
        sku = next((str(fields[lower[k]]) for k in _SKU_KEYS if k in lower), None)
        link = next((str(fields[lower[k]]) for k in _URL_KEYS if k in lower), None)
        lines = [f"{k}: {_value(v)}" for k, v in fields.items()]
        sections.append(
            Section(
                heading=sku or f"#{n}",
                paragraphs=["\n".join(lines)],
                whole=True,
                title=name or sku or f"#{n}",
                url=link if link and link.startswith(("http://", "https://", "/")) else None,
            )
        )
    if not sections:
        raise KnowledgeError(f"{path}: the catalogue lists no products; add some rows")
    return _title_from_stem(path), None, sections


def _value(v: Any) -> str:
    if isinstance(v, list | dict):
        return json.dumps(v, ensure_ascii=False)
    return str(v)
