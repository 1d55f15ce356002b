"""Which language a canned text should be in: the shopper's, guessed from the message."""

from __future__ import annotations


def mostly_chinese(text: str) -> bool:
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    letters = sum(1 for ch in text if ch.isalpha())
    return cjk > 0 and cjk * 2 >= letters


def pick(message: str, en: str, zh: str | None) -> str:
    return zh if zh and mostly_chinese(message) else en
