"""Text normalisation, clause splitting and features for routing.

Everything that matches text (rules, FAQ, signals, the classifier) sees the same normalised
form, so a rule written in traditional Chinese, full-width characters or with Vietnamese
diacritics matches the message however the shopper typed it:

- NFKC (full-width -> half-width, compatibility forms), lower case;
- traditional -> simplified Chinese (OpenCC), so one example serves both scripts;
- Latin letters lose their diacritics (Vietnamese shoppers often type without them);
- simulator directives (`[[sim:...]]`) are dropped: they steer the test model, not routing.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import opencc

from orchestration.language import HAN_RE

_T2S = opencc.OpenCC("t2s")
_DIRECTIVE = re.compile(r"\[\[sim:[^\]]*\]\]")
_SPACES = re.compile(r"\s+")
# Circled numbers and list bullets start a new question ("①... ②...").
_LIST_MARK = re.compile(r"[\u2460-\u2473\u2776-\u277f•·]|(?:^|\s)\d[.)、]\s*")

# CJK ideographs and kana: features are character n-grams (no word segmenter needed).
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaffー]+")
_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")
_NUMBER = re.compile(r"\d+")
# Anything that is neither a word nor CJK but says something (emoji, ?, !).
_SYMBOL = re.compile(r"[?!\U0001f000-\U0001faff\u2600-\u27bf]")


@lru_cache(maxsize=4096)
def _fold_char(ch: str) -> str:
    if ch in "đĐ":
        return "d"
    decomposed = unicodedata.normalize("NFKD", ch)
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    return base or ch


def _fold_latin(text: str) -> str:
    # Only Latin-range characters are folded: NFKD would split Japanese kana (が -> か + ゛).
    if text.isascii():
        return text
    return "".join(
        _fold_char(c) if "\u00c0" <= c <= "\u024f" or "\u1e00" <= c <= "\u1eff" else c for c in text
    )


def normalize(text: str) -> str:
    """The form every matcher sees (see the module docstring)."""
    t = _DIRECTIVE.sub(" ", text)
    t = _LIST_MARK.sub("\n", t)
    t = unicodedata.normalize("NFKC", t)
    if HAN_RE.search(t):
        t = _T2S.convert(t)
    t = _fold_latin(t.lower())
    return _SPACES.sub(" ", t).strip()


def normalize_pattern(pattern: str) -> str:
    """Normalise a configured keyword or regex the way messages are (regex syntax is ASCII)."""
    t = unicodedata.normalize("NFKC", pattern)
    if HAN_RE.search(t):
        t = _T2S.convert(t)
    return _fold_latin(t.lower())


def visible_length(text: str) -> int:
    """Length in "reading units": a CJK character counts 2, other characters 1."""
    return len(text) + sum(len(run) for run in _CJK_RUN.findall(text))


# Clause boundaries: punctuation, and words that start another question.
_CLAUSE_SPLIT = re.compile(
    r"[,，。.!！?？;；\n、:：~～]+"
    # Chinese and Japanese shoppers use a space where a comma would be.
    r"|(?<=[\u3040-\u30ff\u3400-\u9fff])\s+(?=[\u3040-\u30ff\u3400-\u9fff])"
    r"|\s(?:also|and also|plus|btw|by the way|another thing|oh and)\s"
    r"|(?:另外|对了|顺便问?一?下?|还想问|再问一?下|还有就是)"
    r"|(?:あと|それと|それから|ついでに)"
    r"|\s(?:con|voi lai|them nua|ngoai ra)\s"
)


def clauses(norm: str) -> list[str]:
    """Split a normalised message into clauses worth classifying on their own."""
    parts = [p.strip() for p in _CLAUSE_SPLIT.split(norm)]
    return [p for p in parts if p]


def features(norm: str) -> list[str]:
    """Distinct features of a normalised text.

    CJK runs give character uni-, bi- and trigrams; Latin words give the word, word
    bigrams and character trigrams of the padded word (robust to typos and to pinyin
    written with or without spaces). Digits collapse to `0`, so order numbers generalise.
    """
    text = _NUMBER.sub("0", norm)
    out: set[str] = set()
    for run in _CJK_RUN.findall(text):
        n = len(run)
        for i in range(n):
            out.add(run[i])
            if i + 1 < n:
                out.add(run[i : i + 2])
            if i + 2 < n:
                out.add(run[i : i + 3])
        if n <= 4:
            out.add("=" + run)  # a whole short run ("谢谢", "喂") is telling on its own
    words = _WORD.findall(text)
    prev = ""
    for w in words:
        out.add("w:" + w)
        if prev:
            out.add("b:" + prev + " " + w)
        prev = w
        if len(w) > 3:
            padded = f"<{w}>"
            for i in range(len(padded) - 2):
                out.add("c:" + padded[i : i + 3])
    for sym in _SYMBOL.findall(text):
        out.add("s:" + sym)
    if not out:
        out.add("<empty>")
    return list(out)
