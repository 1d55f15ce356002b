"""Which language a shopper wrote in: the one place the service and the simulator guess it.

Two questions, two answers:
- `language(text)`: the script the shopper used (ja, zh, ko, vi, en), to pick one of the
  per-language answers of an FAQ; any hanzi without kana makes it "zh".
- `mostly_chinese(text)`: whether a text written half in Chinese, half in Latin letters
  ("我想 cancel 这个 order") should be answered in Chinese rather than English, for the texts
  that come in a zh/en pair (canned answers, the simulator's replies).

It imports nothing of the service, so the simulator can use it too.
"""

from __future__ import annotations

import re

# CJK ideographs (extension A, the unified block, compatibility ideographs).
HAN_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_KANA_RE = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")
_HANGUL_RE = re.compile(r"[\uac00-\ud7af]")
# Letters only Vietnamese uses (checked before diacritics are stripped).
_VIET_RE = re.compile(r"[ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]", re.IGNORECASE)


# Vietnamese typed without diacritics ("phi ship ve Ha Noi bao nhieu"), as many shoppers
# write it: common syllables that are not English words.
VI_BARE_SYLLABLES = frozenset(
    """co khong duoc bao nhieu lau nao toi ban cua voi thi sao lam roi chua ve het tien
    ngay hang tra doi giao mat bi nhe mua dau minh nhan gui phi mien khi neu hoa don bang
    thanh toan phieu giam gia hanh tai nghe dien thoai vay""".split()
)
_ASCII_WORD_RE = re.compile(r"[a-z]+")


def bare_vietnamese(
    words: list[str],
    syllables: frozenset[str] = VI_BARE_SYLLABLES,
    ignore: frozenset[str] = frozenset(),
) -> bool:
    """Whether lower-case `words` read as Vietnamese without its diacritics: two or more
    common `syllables` making at least 40% of the words (`ignore`: words that never count,
    such as English stopwords)."""
    hits = sum(w in syllables and w not in ignore for w in words)
    return hits >= 2 and hits * 10 >= len(words) * 4


def language(text: str) -> str:
    """A rough language tag of the raw text: ja, zh, ko, vi or en (for FAQ answers)."""
    if _KANA_RE.search(text):
        return "ja"
    if HAN_RE.search(text):
        return "zh"
    if _HANGUL_RE.search(text):
        return "ko"
    if _VIET_RE.search(text) or bare_vietnamese(_ASCII_WORD_RE.findall(text.lower())):
        return "vi"
    return "en"


def _is_han(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _is_latin(ch: str) -> bool:
    return ch.isascii() or "\u00c0" <= ch <= "\u024f" or "\u1e00" <= ch <= "\u1eff"


def mostly_chinese(text: str) -> bool:
    """Whether the hanzi of `text` outweigh its other letters.

    A hanzi says about as much as a short word, so it weighs as much as three Latin
    letters ("SUMMER30还能用吗" is Chinese); a kana or hangul letter weighs as much as a
    hanzi, so Japanese, whose kanji come with kana, is not Chinese.
    """
    if text.isascii():
        return False
    han = latin = other = 0
    for ch in text:
        if _is_han(ch):
            han += 1
        elif ch.isalpha():
            if _is_latin(ch):
                latin += 1
            else:
                other += 1
    return han > 0 and 3 * han >= latin + 3 * other


def pick(message: str, en: str, zh: str | None) -> str:
    """The Chinese text of a pair for a mostly Chinese message, else the English one."""
    return zh if zh and mostly_chinese(message) else en
