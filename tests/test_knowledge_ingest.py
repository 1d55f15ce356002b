"""Shop documents go in: every kind of file with its title, headings and link; every bad
file refused with advice, nothing half-indexed."""

from __future__ import annotations

from pathlib import Path

import pytest
from fpdf import FPDF

from knowledge.chunking import chunk_sections
from knowledge.errors import KnowledgeError
from knowledge.sources import Section, read_document
from storage.knowledge import generations
from tests.knowledge_support import DATA, open_database, open_kb

HTML_PAGE = """<!doctype html>
<html><head>
  <title>Aurora Wireless Earbuds – Shop</title>
  <link rel="canonical" href="https://shop.example/p/el-1001">
  <style>body { color: red }</style>
  <script>var tracking = "do not index me";</script>
</head><body>
  <nav><a href="/">Home</a> <a href="/cart">Cart menu</a></nav>
  <h1>Aurora Wireless Earbuds</h1>
  <p>Active noise cancelling earbuds with <b>30 hours</b> of battery with the case.</p>
  <h2>Specifications</h2>
  <table><tr><th>Bluetooth</th><td>5.3</td></tr><tr><th>Water resistance</th><td>IPX4</td></tr>
  </table>
  <h3>In the box</h3>
  <ul><li>Earbuds</li><li>USB-C cable</li></ul>
  <footer>Copyright footer text</footer>
</body></html>
"""


def _pdf(path: Path, pages: list[str], title: str | None = "Warranty card") -> Path:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))
    return path


def test_markdown_keeps_title_link_and_heading_path() -> None:
    doc = read_document(DATA / "returns.en.md")
    assert doc.title == "Returns and refunds"
    assert doc.url == "https://shop.example/help/returns"
    assert doc.kind == "markdown"
    headings = [s.heading for s in doc.sections]
    assert headings == ["", "Unopened items", "Opened items", "Refund timing"]
    opened = doc.sections[2]
    assert "14 days" in opened.paragraphs[0]
    assert "**" not in " ".join(opened.paragraphs)


def test_nested_markdown_headings_form_a_path(tmp_path: Path) -> None:
    f = tmp_path / "size-guide.md"
    f.write_text(
        "# Size guide\n\n## Shoes\n\n### Running\n\nTrue to size.\n\n## Jackets\n\nRoomy.\n"
    )
    doc = read_document(f, url_prefix="https://shop.example/help/")
    assert doc.url == "https://shop.example/help/size-guide"
    assert [(s.heading, s.paragraphs) for s in doc.sections] == [
        ("Shoes › Running", ["True to size."]),
        ("Jackets", ["Roomy."]),
    ]


def test_html_drops_navigation_and_scripts(tmp_path: Path) -> None:
    f = tmp_path / "earbuds.html"
    f.write_text(HTML_PAGE)
    doc = read_document(f)
    assert doc.title == "Aurora Wireless Earbuds"  # the page's h1, not the site's <title>
    assert doc.url == "https://shop.example/p/el-1001"
    text = "\n".join(p for s in doc.sections for p in s.paragraphs)
    assert "30 hours" in text
    assert "Water resistance | IPX4" in text
    assert "- Earbuds\n- USB-C cable" in text  # a list stays one paragraph
    for gone in ("tracking", "Cart menu", "Copyright", "color: red"):
        assert gone not in text
    assert [s.heading for s in doc.sections] == [
        "",
        "Specifications",
        "Specifications › In the box",
    ]


def test_html_og_url_when_no_canonical(tmp_path: Path) -> None:
    f = tmp_path / "p.htm"
    f.write_text(
        '<html><head><meta property="og:url" content="https://shop.example/p/x"></head>'
        "<body><h1>X</h1><div>Plain text in a div.</div></body></html>"
    )
    doc = read_document(f)
    assert doc.url == "https://shop.example/p/x"
    assert doc.title == "X"
    assert doc.sections[0].paragraphs == ["Plain text in a div."]


def test_pdf_text_and_title(tmp_path: Path) -> None:
    f = _pdf(
        tmp_path / "warranty-card.pdf",
        [
            "Warranty card\n\nAll devices carry a 24 month warranty.",
            "Keep this card and the receipt.",
        ],
    )
    doc = read_document(f.as_uri())  # a file:// URL of a local file works too
    assert doc.kind == "pdf"
    assert doc.title == "Warranty card"
    assert doc.url is None
    assert [s.heading for s in doc.sections] == ["Page 1", "Page 2"]
    assert "24 month warranty" in " ".join(doc.sections[0].paragraphs)


def test_plain_text_title_from_first_line(tmp_path: Path) -> None:
    f = tmp_path / "payment.txt"
    f.write_text(
        "Payment methods\n\nWe accept Visa, Mastercard and Alipay.\n\nNo cash on delivery.\n"
    )
    doc = read_document(f)
    assert doc.title == "Payment methods"
    assert doc.sections[0].paragraphs == [
        "We accept Visa, Mastercard and Alipay.",
        "No cash on delivery.",
    ]


def test_catalogue_csv_and_json_one_chunk_per_product() -> None:
    csv_doc = read_document(DATA / "catalogue.csv")
    chunks = chunk_sections(csv_doc.sections)
    assert [(c.heading, c.title) for c in chunks] == [
        ("EL-1001", "Aurora Wireless Earbuds"),
        ("EL-1003", "Nimbus Smart Watch"),
        ("HM-3001", "Robo Vacuum X"),
    ]
    assert chunks[0].url == "https://shop.example/p/el-1001"
    assert chunks[2].url is None
    assert "battery: 30 hours with case" in chunks[0].text
    json_doc = read_document(DATA / "catalogue.json")
    jchunks = chunk_sections(json_doc.sections)
    assert [c.heading for c in jchunks] == ["CL-2001", "CL-2003"]
    assert 'sizes: ["S", "M", "L"]' in jchunks[0].text


def test_chunks_merge_short_paragraphs_and_split_long_ones_at_sentence_ends() -> None:
    long_en = " ".join(f"Sentence number {i} is about returns." for i in range(40))
    long_zh = "".join(f"第{i}句话说明退货规则。" for i in range(80))
    sections = [
        Section("A", ["one.", "two.", "three."]),
        Section("B", [long_en]),
        Section("C", [long_zh]),
    ]
    chunks = chunk_sections(sections, chunk_chars=200)
    a = [c for c in chunks if c.heading == "A"]
    assert len(a) == 1 and a[0].text == "one.\n\ntwo.\n\nthree."
    for heading, end in (("B", "."), ("C", "。")):
        parts = [c for c in chunks if c.heading == heading]
        assert len(parts) > 2
        assert all(len(c.text) <= 200 and c.text.endswith(end) for c in parts)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize(
    ("name", "content", "advice"),
    [
        ("empty.md", b"", "the file is empty"),
        ("blank.txt", b"  \n\n \n", "only blank space"),
        ("binary.md", b"# Title\n\x00\x01\x02\x03 binary", "binary content"),
        ("latin1.txt", "Rückgabe innerhalb von 30 Tagen".encode("latin-1"), "save it as UTF-8"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf at all", "not a readable PDF"),
        ("notes.docx", b"PK\x03\x04", "supported: .csv"),
        ("bad.json", b'{"products": [', "not valid JSON"),
    ],
)
async def test_bad_files_are_refused_with_advice_and_store_nothing(
    db_url: str, tmp_path: Path, name: str, content: bytes, advice: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    async with open_database(db_url) as database, open_kb(database) as kb:
        with pytest.raises(KnowledgeError, match=advice):
            await kb.add(f)
        assert await kb.documents() == []
        assert await database.read(generations) == {}


async def test_scanned_pdf_without_text_layer_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 100, 60, style="F")  # a picture of a page, no text
    f = tmp_path / "scan.pdf"
    pdf.output(str(f))
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        with pytest.raises(KnowledgeError, match="no text layer — scanned"):
            await kb.add(f)
        assert await kb.documents() == []


async def test_password_protected_pdf_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    pdf = FPDF()
    pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "Secret policy text")
    f = tmp_path / "locked.pdf"
    pdf.output(str(f))
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        with pytest.raises(KnowledgeError, match="password-protected; save an unprotected copy"):
            await kb.add(f)
        assert await kb.documents() == []


async def test_huge_file_is_refused_by_size_before_reading(tmp_path: Path, sqlite_url: str) -> None:
    f = tmp_path / "huge.txt"
    with f.open("wb") as fh:
        fh.truncate(200 * 1024 * 1024)  # sparse: 200 MB that take no disk
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        with pytest.raises(KnowledgeError, match="200 MB is over the 20 MB limit"):
            await kb.add(f)
        assert await kb.documents() == []


def test_only_local_files_are_read() -> None:
    with pytest.raises(KnowledgeError, match="only local files are read"):
        read_document("https://shop.example/help/returns.html")
    with pytest.raises(KnowledgeError, match="no such file"):
        read_document("file:///nonexistent/returns.md")


async def test_readding_a_changed_file_bumps_its_version(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "coupons.md"
    f.write_text("# Coupons\n\nOne coupon per order.\n")
    async with open_database(db_url) as database, open_kb(database) as kb:
        first = await kb.add(f)
        assert (first.version, first.changed, first.chunks) == (1, True, 1)
        same = await kb.add(f)
        assert (same.version, same.changed, same.document_id) == (1, False, first.document_id)
        f.write_text("# Coupons\n\nTwo coupons per order since December.\n")
        second = await kb.add(f)
        assert (second.version, second.changed, second.document_id) == (2, True, first.document_id)
        [doc] = await kb.documents()
        assert (doc.version, doc.chunks, doc.title) == (2, 1, "Coupons")
        [hit] = await kb.search("how many coupons per order")
        assert "Two coupons" in hit.text and hit.version == 2

        # A bad new version leaves the good old one in place.
        f.write_bytes(b"\x00\x00")
        with pytest.raises(KnowledgeError):
            await kb.add(f)
        [doc] = await kb.documents()
        assert doc.version == 2

        removed = await kb.remove(str(f))
        assert removed.id == first.document_id
        assert await kb.documents() == []
        assert await kb.search("how many coupons per order") == []
        with pytest.raises(KnowledgeError, match="kb list"):
            await kb.remove(str(f))


async def test_batch_add_keeps_the_good_files(tmp_path: Path, sqlite_url: str) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nFine text.\n")
    (folder / "empty.txt").write_text("")
    (folder / "ignored.docx").write_text("not a kind we read, skipped when a folder is given")
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        added, failed = await kb.add_many([folder, tmp_path / "missing.md"])
        assert [Path(a.source).name for a in added] == ["good.md"]
        assert sorted(Path(f.source).name for f in failed) == ["empty.txt", "missing.md"]
        assert all(f.reason for f in failed)
        assert [Path(d.source).name for d in await kb.documents()] == ["good.md"]
