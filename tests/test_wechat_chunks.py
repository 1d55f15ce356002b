"""Splitting answers for WeChat: at most 2,048 bytes of UTF-8 per message, on sentence ends,
nothing lost or repeated."""

from __future__ import annotations

import random

import pytest

from channels.wechat.chunks import complete_length, split_text, utf8_len

ZH = "您好，感谢您的咨询！目前订单状态正常，发货后会第一时间通知您。请问还有什么可以帮您的吗？"
EN = "Your order ships tomorrow. It costs 3.5 EUR to ship to Lyon! Anything else? "


@pytest.mark.parametrize("limit", [64, 300, 2048])
@pytest.mark.parametrize("text", [ZH * 40, EN * 60, (ZH + EN + "\n") * 30])
def test_pieces_fit_join_exactly_and_end_on_sentences(text: str, limit: int) -> None:
    pieces = split_text(text, limit)
    assert "".join(pieces) == text
    assert all(0 < utf8_len(p) <= limit for p in pieces)
    for p in pieces[:-1]:
        assert p.rstrip().endswith(("。", "！", "？", ".", "!", "?")), p[-20:]


def test_few_pieces_bytes_not_characters() -> None:
    text = ZH * 60  # 2,700 characters, 8,100 bytes
    pieces = split_text(text, 2048)
    assert len(pieces) == 4  # packed full: ceil(8100 / 2048) pieces of whole sentences
    assert sum(utf8_len(p) for p in pieces) == utf8_len(text)


def test_a_sentence_longer_than_the_limit_breaks_at_a_comma_or_character() -> None:
    long_clause = "这件大衣采用百分之百羊毛面料，" * 200  # one sentence, no full stop
    pieces = split_text(long_clause, 2048)
    assert "".join(pieces) == long_clause
    assert all(utf8_len(p) <= 2048 for p in pieces)
    assert all(p.endswith("，") for p in pieces[:-1])
    no_breaks = "好" * 1500
    pieces = split_text(no_breaks, 2048)
    assert "".join(pieces) == no_breaks and [utf8_len(p) for p in pieces] == [2046, 2046, 408]


def test_emoji_sequences_are_not_cut_apart() -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"
    text = family * 200
    for piece in split_text(text, 100):
        assert piece.startswith("👨") and not piece.endswith("\u200d")
    assert "".join(split_text(text, 100)) == text


def test_random_texts_round_trip() -> None:
    rng = random.Random(7)
    alphabet = [*"ab c。！？.!? \n好的👍é", "\u200d", "🏻"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        limit = rng.choice([8, 16, 50, 2048])
        pieces = split_text(text, limit)
        assert "".join(pieces) == text
        assert all(0 < utf8_len(p) <= limit for p in pieces)


def test_complete_length_stops_at_the_last_finished_sentence() -> None:
    assert complete_length("你好。我在") == 3
    assert complete_length("Version 3.5 is") == 0
    assert complete_length("Done. Next") == 6
    assert complete_length("Done.") == 0  # "Done.5" may follow: wait for the next delta
    assert complete_length("好的。") == 3
