"""Telegram text rules: splitting at 4,096 UTF-16 units, and formatting that Telegram parses
(checked with the fake Bot API's HTML and MarkdownV2 parsers)."""

from __future__ import annotations

import pytest

from channels.telegram.text import plain, render, split_text, utf16_len
from simulator.fakes.telegram_api import BadRequest, visible

TRICKY = [
    "Plain answer. Nothing to format!",
    "Order **#12 <A&B>** ships *today* (maybe).",
    "Use `code_with_*stars*` and __bold__ and ~~gone~~.",
    "See [our policy](https://shop.example.com/returns?a=1&b=(2)) for details.",
    "### Returns\n- 30 days\n- free pickup: 1.5 kg max!",
    "```python\nprint('a < b & c')  # `tick`\n```\nDone.",
    "snake_case_name and 2*3*4 = 24 and a_b",
    "Unclosed **bold and `code and [link](",
    "价格：¥149.00（含税）。**包邮**！",
    "emoji 😀 **bold 😀** tail \\ backslash",
]


@pytest.mark.parametrize("source", TRICKY)
@pytest.mark.parametrize("mode", ["HTML", "MarkdownV2"])
def test_formatted_text_parses_and_shows_the_plain_text(source: str, mode: str) -> None:
    rendered = render(source, mode)
    try:
        shown, _ = visible(rendered.text, rendered.parse_mode)
    except BadRequest as e:
        pytest.fail(f"Telegram would refuse {rendered.text!r}: {e.description}")
    assert shown == plain(source)


def test_formatting_marks_what_it_should() -> None:
    r = render("Order **#12 <A&B>** ships *today*.", "HTML")
    assert r.parse_mode == "HTML" and r.formatted
    assert r.text == "Order <b>#12 &lt;A&amp;B&gt;</b> ships <i>today</i>."
    assert render("no markup <here> & there", "HTML").parse_mode is None
    assert render("**x**", "none").text == "**x**"


def test_short_text_is_one_piece() -> None:
    assert split_text("  hello  ") == ["hello"]
    assert split_text(" \n ") == []


def test_split_prefers_paragraphs_then_sentences() -> None:
    paragraphs = "\n\n".join(f"Paragraph {i}. " + "word " * 150 for i in range(12))
    pieces = split_text(paragraphs)
    assert len(pieces) > 1
    assert all(utf16_len(p) <= 4096 for p in pieces)
    assert all(p.split()[0] == "Paragraph" for p in pieces), "each piece starts a paragraph"
    assert " ".join(pieces).split() == paragraphs.split()

    sentences = "This is one sentence. " * 400
    pieces = split_text(sentences)
    assert all(p.endswith(".") for p in pieces)
    assert " ".join(pieces).split() == sentences.split()


def test_split_counts_utf16_and_cuts_endless_words() -> None:
    emoji = "😀" * 5000  # two UTF-16 units each
    pieces = split_text(emoji)
    assert [utf16_len(p) for p in pieces] == [4096, 4096, 1808]
    assert "".join(pieces) == emoji
    assert [len(p) for p in split_text("x" * 9000)] == [4096, 4096, 808]
    chinese = "这是一个句子。" * 1000
    assert all(p.endswith("。") for p in split_text(chinese))
