"""Text -> index terms, in every language shoppers write: the same function tokenises the
documents and the questions, so both sides meet on the same terms.

- Han runs: jieba (`cut_for_search`, which adds the short words inside long ones), with a
  small dictionary of shop words (couriers, coupon and invoice kinds: shop_words.zh.txt) so
  "中通" or "专票" stay whole;
- text containing kana: janome (Japanese), content words in their dictionary form;
- Latin words: NFKC, lower case, English Snowball stem;
- Vietnamese (a line with Vietnamese diacritics): syllables, adjacent-syllable bigrams, and
  their diacritic-free forms too, so "tra hang" finds "trả hàng";
- codes like ORD-1001 or EL-1001 stay whole.

Nothing here downloads anything: jieba and janome ship their dictionaries.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import Stemmer  # type: ignore[import-not-found]  # PyStemmer ships no type hints

from orchestration.language import VI_BARE_SYLLABLES, bare_vietnamese

# A Vietnamese bigram joins two syllables with this (never produced by the other paths).
BIGRAM_JOIN = "_"

_CODE = re.compile(r"[A-Za-z]+[A-Za-z0-9]*(?:-[A-Za-z0-9]+)+|[A-Za-z]+\d+[A-Za-z0-9]*")
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA = r"\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_CJK_RUN = re.compile(f"[{_HAN}{_KANA}々〆ー]+")
_HAS_KANA = re.compile(f"[{_KANA}]")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
# Letters only Vietnamese uses among Latin scripts, and its tone marks on vowels.
_VI_LETTERS = set("ăâđêôơưĂÂĐÊÔƠƯ")
_VI_TONES = {"\u0300", "\u0301", "\u0303", "\u0309", "\u0323"}
_CLITIC = re.compile(r"'(s|re|ll|ve|d|m)$")
_LINE = re.compile(r"[\n.!?;。！？；]+")

STOPWORDS_EN = frozenset(
    """a an and are as at be been but by can could did do does for from had has have how i if
    in into is it its me my no not of on or our please so that the their them then there these
    they this to us was we what when where which who why will with would you your yours hi
    hello thanks thank any some about get got tell know want much many long just really
    still something anything anymore someone also even ever very way lot lots like need ok
    okay whats hey there's here i'm im dont don't cant can't does doesn't isn't might may
    shall should use using possible""".split()
)
STOPWORDS_ZH = frozenset(
    "的 了 吗 呢 吧 啊 是 我 你 您 他 她 它 们 我们 你们 在 和 与 及 或 也 都 就 还 要 会 能 "
    "可以 请问 请 一下 这 那 这个 那个 什么 怎么 怎么样 如何 么 有 没有 哪 哪些 多少 "
    "一个 个 把 被 给 对 从 到 为 为了 以 之 而 并 等 不 一 又 很 再 才 让 想 用 去 来 说 做 "
    "呀 哦 嘛 地 得 着 过 谁 啥 怎么办 是不是 能不能 可不可以 还是 如果 的话 现在 已经 "
    "需要 应该 可能 所以 因为 但是 然后 自己 东西 怎样 多久 为什么 咋 咋办 怎么样的".split()
)
STOPWORDS_JA = frozenset(
    "は が を に で と の も へ や か ね よ な です ます でしょ ください する いる ある なる "
    "られる れる こと もの それ これ あれ どう どの どれ 何 なに 私 あなた できる いい "
    "やる もらえる 思う 教える 方 ため よう どこ いつ どうやって ござる いただく 下さる "
    "くださる 大丈夫 ぐらい くらい".split()
)
STOPWORDS_VI = frozenset(
    "tôi bạn anh chị em của và là có không được cho với thì mà này đó những các một "
    "ạ nhé ơi vậy gì nào sao thể muốn hỏi xin thì mình shop được bị làm nhiêu "
    "khi nếu rồi chưa đã sẽ ra vào lên ở đâu".split()
)

# Vietnamese typed without diacritics ("tra hang bao lau"): common syllables that are not
# English words; a segment with enough of them is read as Vietnamese, not stemmed as English.
_VI_BARE_COMMON = VI_BARE_SYLLABLES
_STOP_VI_BARE: frozenset[str] = frozenset()  # filled below, once strip_diacritics exists

# Words jieba's own dictionary lacks or cuts apart ("发中通", "花/呗"), one a line.
SHOP_WORDS_ZH = Path(__file__).with_name("shop_words.zh.txt")

# English shop words in Chinese questions ("shipping fee怎么算的") and their Chinese words.
GLOSSARY_EN_ZH = Path(__file__).with_name("glossary.en-zh.txt")

_lock = threading.Lock()
_jieba: Any = None
_janome: Any = None
_stemmer = Stemmer.Stemmer("english")


def _jieba_module() -> Any:
    global _jieba
    if _jieba is None:
        with _lock:
            if _jieba is None:
                import jieba  # type: ignore[import-untyped]

                jieba.setLogLevel(logging.WARNING)  # it announces its cache on every start
                jieba.initialize()
                # Documents and questions are cut with the same words: a changed list needs
                # a new VERSION (stored passages are then cut again when loaded).
                jieba.load_userdict(str(SHOP_WORDS_ZH))
                _jieba = jieba
    return _jieba


def _janome_tokenizer() -> Any:
    global _janome
    if _janome is None:
        with _lock:
            if _janome is None:
                from janome.tokenizer import Tokenizer

                _janome = Tokenizer()
    return _janome


def warm_up() -> None:
    """Load both dictionaries now (a second or two) rather than on the first question."""
    _jieba_module()
    _janome_tokenizer()


def strip_diacritics(word: str) -> str:
    """ "trả hàng" -> "tra hang" (đ -> d too)."""
    decomposed = unicodedata.normalize("NFD", word)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.replace("đ", "d").replace("Đ", "D")


_STOP_VI_BARE = frozenset(strip_diacritics(w) for w in STOPWORDS_VI) - {"bao", "tra", "hang"}


def _is_vietnamese(word: str) -> bool:
    if any(c in _VI_LETTERS for c in word):
        return True
    decomposed = unicodedata.normalize("NFD", word)
    return any(c in _VI_TONES for c in decomposed)


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return str(_stemmer.stemWord(word))


def _latin_terms(segment: str, out: list[str]) -> None:
    codes = [m.group(0) for m in _CODE.finditer(segment) if any(c.isdigit() for c in m.group(0))]
    for code in codes:
        out.append(code.lower())
        segment = segment.replace(code, " ")
    words = [w.lower() for w in _WORD.findall(segment)]
    if not words:
        return
    if any(_is_vietnamese(w) for w in words) or _bare_vietnamese(words):
        _vietnamese_terms(words, out)
        return
    for w in words:
        w = _CLITIC.sub("", w.replace("’", "'"))
        if w in STOPWORDS_EN:
            continue
        out.append(_stem(w))


def _bare_vietnamese(words: list[str]) -> bool:
    return bare_vietnamese(words, _VI_BARE_COMMON | _STOP_VI_BARE, ignore=STOPWORDS_EN)


def _vietnamese_terms(syllables: list[str], out: list[str]) -> None:
    kept: list[str] = []
    for s in syllables:
        if s in STOPWORDS_VI or (s == strip_diacritics(s) and s in _STOP_VI_BARE):
            kept.append("")  # a stopword breaks bigrams too
            continue
        bare = strip_diacritics(s)
        out.append(s)
        if bare != s:
            out.append(bare)
        # A question typed without diacritics goes the English way (stemmed): meet it.
        stem = _stem(bare)
        if stem != bare:
            out.append(stem)
        kept.append(s)
    for a, b in itertools.pairwise(kept):
        if a and b:
            out.append(f"{a}{BIGRAM_JOIN}{b}")
            bare_pair = f"{strip_diacritics(a)}{BIGRAM_JOIN}{strip_diacritics(b)}"
            if bare_pair != out[-1]:
                out.append(bare_pair)


def _chinese_terms(run: str, out: list[str]) -> None:
    jieba = _jieba_module()
    for w in jieba.cut_for_search(run):
        w = w.strip()
        if len(w) > 1 and w not in jieba.dt.FREQ:
            # A word jieba made up (its HMM glues leftover characters: "公司要开" -> "要开")
            # sheds a particle or modal at either end, so "开" meets the page's "开具".
            if w[0] in STOPWORDS_ZH:
                w = w[1:]
            if len(w) > 1 and w[-1] in STOPWORDS_ZH:
                w = w[:-1]
        if w and w not in STOPWORDS_ZH:
            out.append(w)


_JA_SKIP = ("助詞", "助動詞", "記号", "補助記号", "フィラー")


def _japanese_terms(run: str, out: list[str]) -> None:
    tokenizer = _janome_tokenizer()
    with _lock:  # a janome Tokenizer keeps state while it tokenises
        tokens = list(tokenizer.tokenize(run))
    for t in tokens:
        if t.part_of_speech.split(",", 1)[0] in _JA_SKIP:
            continue
        base = t.base_form if t.base_form and t.base_form != "*" else t.surface
        if base not in STOPWORDS_JA and len(base.strip()) > 0:
            out.append(base)


# Bump when `terms` cuts any text differently (a dictionary, a rule, a stopword): passages
# stored by another version are cut again when their collection is loaded.
VERSION = "2"


def passage_terms(title: str, heading: str, text: str) -> str:
    """A passage's stored index terms: its title and heading count as its words too."""
    return " ".join(terms(f"{title}\n{heading}\n{text}"))


def terms(text: str) -> list[str]:
    """The index terms of `text`, in order, repeats kept (BM25 counts them)."""
    text = unicodedata.normalize("NFKC", text)
    japanese = _HAS_KANA.search(text) is not None
    out: list[str] = []
    # Lines and sentences keep Vietnamese detection local (a Vietnamese line in an English
    # page) and stop bigrams crossing sentence ends.
    for segment in _LINE.split(text):
        pos = 0
        for m in _CJK_RUN.finditer(segment):
            if m.start() > pos:
                _latin_terms(segment[pos : m.start()], out)
            if japanese:
                _japanese_terms(m.group(0), out)
            else:
                _chinese_terms(m.group(0), out)
            pos = m.end()
        if pos < len(segment):
            _latin_terms(segment[pos:], out)
    return out


_HAN_CHAR = re.compile(f"[{_HAN}]")
_KANA_CHAR = re.compile(f"[{_KANA}]")


def language(text: str) -> str:
    """The language most of `text` is written in, by script: "zh", "ja", "vi", "en" (any
    other Latin script), or "" (no letters). A few English words in a Chinese sentence
    ("耳机拆封了还能return吗") leave it Chinese: a Han character weighs as much as a word."""
    text = unicodedata.normalize("NFKC", text)
    kana = len(_KANA_CHAR.findall(text))
    han = len(_HAN_CHAR.findall(text))
    words = [w.lower() for w in _WORD.findall(_CJK_RUN.sub(" ", text)) if not w.isdigit()]
    if kana + han and kana + han >= len(words):
        # Kanji-only Japanese is rare in a sentence (particles are kana); so is kana in Chinese.
        return "ja" if kana * 10 >= kana + han else "zh"
    if not words:
        return ""
    marked = sum(_is_vietnamese(w) for w in words)
    if marked * 5 >= len(words) or _bare_vietnamese(words):
        return "vi"
    return "en"


@lru_cache(maxsize=1)
def _glossary() -> tuple[re.Pattern[str], dict[str, str]]:
    entries: dict[str, str] = {}
    for line in GLOSSARY_EN_ZH.read_text("utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            english, _, chinese = line.partition("\t")
            entries[english.strip().lower()] = chinese.strip()
    phrases = sorted(entries, key=len, reverse=True)  # "free shipping" before "shipping"
    alternatives = "|".join(re.escape(p) for p in phrases)
    return re.compile(f"(?<![A-Za-z])({alternatives})(?![A-Za-z])", re.IGNORECASE), entries


def in_chinese(query: str) -> str | None:
    """A mostly Chinese question with its English shop words put in Chinese ("shipping
    fee怎么算的" -> "运费怎么算的"), so the shop's Chinese page, not its English one, answers
    it; None when the question is not mostly Chinese or has no such word."""
    if language(query) != "zh":
        return None
    pattern, entries = _glossary()
    out, count = pattern.subn(lambda m: f" {entries[m.group(1).lower()]} ", query)
    return out if count else None


def is_bigram(term: str) -> bool:
    return BIGRAM_JOIN in term
