"""The simulator's text: canned customer-service replies, and text cut into tokens.

`reply_tokens` writes the reply to an ordinary chat request: a greeting, a sentence that
echoes the question, body sentences, closings that make up exactly the requested number of
tokens, in Chinese for a mostly Chinese question, else in English. It is cached: the same
question and length get the same reply, generated once.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator, Sequence

from orchestration.language import mostly_chinese

_TOKEN_RE = re.compile(
    r"\s*(?:[A-Za-z0-9]{1,6}|[\u3400-\u4dbf\u4e00-\u9fff]{1,2}|[^\sA-Za-z0-9\u3400-\u4dbf\u4e00-\u9fff])"
    r"|\s+"
)


def text_tokens(text: str) -> tuple[str, ...]:
    """Model-like pieces of `text` (words, one or two hanzi, punctuation); they join to it."""
    return tuple(_TOKEN_RE.findall(text))


# --- canned replies -----------------------------------------------------------------------

_EN_OPENERS = (
    "Thanks for reaching out!",
    "Hi there, thank you for your message.",
    "Hello, and thanks for contacting us.",
)
_EN_ACKS = (
    "You asked: {q}. I'm happy to help with that.",
    "About {q}: let me look into it for you.",
    "Regarding {q}, here is what I can tell you.",
)
_EN_BODIES = (
    "I have checked the details on our side and everything looks in order.",
    "Your order is being processed and you will get an update as soon as it ships.",
    "If anything is unclear, just reply here and I will follow up right away.",
    "Our team usually resolves questions like this within one business day.",
    "You can also see the latest status on the order page of your account.",
    "We appreciate your patience and are sorry for any inconvenience.",
    "Please keep your order number handy in case we need to confirm a detail.",
    "Is there anything else I can help you with today?",
)
_EN_TAG = " (simulated)"

_ZH_OPENERS = ("您好，感谢您的咨询！", "亲，您好！很高兴为您服务。", "您好，收到您的消息了。")
_ZH_ACKS = (
    "关于{q}，我已经为您查询过了。",
    "您提到的{q}，我们这边马上为您处理。",
    "针对{q}这个问题，我来为您说明一下。",
)
_ZH_BODIES = (
    "目前订单状态正常，发货后会第一时间通知您。",
    "如果还有其他问题，欢迎随时联系我们。",
    "给您带来的不便，我们深表歉意。",
    "一般情况下，我们会在一个工作日内处理完毕。",
    "您也可以在“我的订单”页面查看最新进度。",
    "请您保留好订单号，方便我们核对信息。",
    "请问还有什么可以帮您的吗？",
)

_SENTENCE_END = (".", "!", "?", "。", "！", "？", "…")
_MAX_WORD_PIECE = 8

# Short closing sentences of distinct lengths 1..8 tokens, in reading order. Any gap of up
# to 36 tokens between the last whole sentence and the requested length is filled exactly
# by a few of them, so replies end on a sentence instead of being cut mid-word.
_EN_CLOSINGS = (
    "We are always happy to help.",
    "Thanks for your patience!",
    "Thank you again for shopping with us!",
    "Have a great day!",
    "Thanks so much!",
    "Thank you!",
    "Thanks!",
    "Kind regards from your friendly customer care team.",
)
_ZH_CLOSINGS = (
    ("感谢", "您", "对", "本店", "的", "支持", "与", "信任。"),
    ("如有", "问题", "欢迎", "随时", "咨询", "。"),
    ("我们", "一直", "都在", "，", "随时", "为您", "服务。"),
    ("期待", "再次", "为您", "服务", "。"),
    ("感谢", "您的", "耐心！"),
    ("祝您", "购物", "愉快", "！"),
    ("欢迎", "再次光临！"),
    ("谢谢！",),
)


def _quote(question: str, chinese: bool) -> str:
    text = " ".join(question.split())
    if not text:
        return "您的问题" if chinese else "your question"
    limit = 20 if chinese else 48
    if len(text) > limit:
        cut = text[:limit]
        if not chinese and " " in cut:
            cut = cut.rsplit(" ", 1)[0]
        text = cut.rstrip() + "…"
    return f"“{text}”"


def _english_tokens(sentence: str, first: bool) -> list[str]:
    """Word pieces: a word with its leading space, long words split in pieces."""
    tokens: list[str] = []
    for i, word in enumerate(sentence.split()):
        lead = "" if first and i == 0 else " "
        pieces = [word[j : j + _MAX_WORD_PIECE] for j in range(0, len(word), _MAX_WORD_PIECE)]
        tokens.append(lead + pieces[0])
        tokens.extend(pieces[1:])
    return tokens


def _chinese_tokens(sentence: str, rng: random.Random) -> list[str]:
    """Pieces of one or two characters, like a BPE vocabulary with common bigrams."""
    tokens: list[str] = []
    i = 0
    while i < len(sentence):
        step = 2 if rng.random() < 0.5 else 1
        tokens.append(sentence[i : i + step])
        i += step
    return tokens


def _closings_by_length(closings: Sequence[Sequence[str]]) -> dict[int, tuple[int, list[str]]]:
    """{token count: (reading position, tokens)}; the counts must be distinct."""
    table = {len(c): (pos, list(c)) for pos, c in enumerate(closings)}
    assert len(table) == len(closings), "closing lengths must be distinct"
    return table


_CLOSINGS = {
    False: _closings_by_length([_english_tokens(c, first=False) for c in _EN_CLOSINGS]),
    True: _closings_by_length(_ZH_CLOSINGS),
}


def _closing(n_tokens: int, chinese: bool) -> list[str] | None:
    """Closing sentences of exactly `n_tokens` tokens, or None if they cannot make it."""
    table = _CLOSINGS[chinese]
    chosen: list[tuple[int, list[str]]] = []
    left = n_tokens
    for length in sorted(table, reverse=True):  # greedy works: lengths 1..k all exist
        if length <= left:
            chosen.append(table[length])
            left -= length
    if left:
        return None
    return [token for _, tokens in sorted(chosen) for token in tokens]


def _sentences(
    rng: random.Random, opener: str | None, ack: str, bodies: Sequence[str]
) -> Iterator[str]:
    if opener is not None:
        yield opener
    yield ack
    while True:  # the body sentences, reshuffled on every round
        pool = list(bodies)
        rng.shuffle(pool)
        yield from pool


@functools.lru_cache(maxsize=4096)
def reply_tokens(question: str, n_tokens: int, seed: int | None = None) -> tuple[str, ...]:
    """The reply to `question` as exactly `n_tokens` tokens; the same input, the same reply.

    Whole sentences as long as they fit, then closing sentences that fill the rest
    exactly, then a short "simulated" tag; only a reply too short for its first sentence
    is cut mid-sentence.
    """
    if n_tokens <= 0:
        return ()
    rng = random.Random(f"{seed}|{question}")  # str seeds hash with SHA-512: stable
    chinese = mostly_chinese(question)
    quote = _quote(question, chinese)
    if chinese:
        opener, ack = rng.choice(_ZH_OPENERS), rng.choice(_ZH_ACKS).format(q=quote)
        tag_tokens = ["（模拟", "回复）"]
    else:
        opener, ack = rng.choice(_EN_OPENERS), rng.choice(_EN_ACKS).format(q=quote)
        tag_tokens = _english_tokens(_EN_TAG, first=False)
    with_tag = n_tokens >= len(tag_tokens) + 8
    body_len = n_tokens - len(tag_tokens) if with_tag else n_tokens
    # Echoing the question matters more than the greeting: drop the greeting if both
    # do not fit. (Token counts of English sentences do not depend on the rng.)
    if chinese:
        both_fit = len(opener) + len(ack) <= body_len * 3 // 2  # ~1.5 hanzi per token
    else:
        both_fit = (
            len(_english_tokens(opener, first=True)) + len(_english_tokens(ack, first=False))
            <= body_len
        )
    sentences = _sentences(
        rng, opener if both_fit else None, ack, _ZH_BODIES if chinese else _EN_BODIES
    )

    tokens: list[str] = []
    for sentence in sentences:
        if chinese:
            pieces = _chinese_tokens(sentence, rng)
        else:
            pieces = _english_tokens(sentence, first=not tokens)
        if len(tokens) + len(pieces) <= body_len:
            tokens.extend(pieces)
            continue
        closing = _closing(body_len - len(tokens), chinese) if tokens else None
        if closing is not None:
            tokens.extend(closing)
        else:  # too short for even one sentence: cut it
            tokens.extend(pieces[: body_len - len(tokens)])
            if not tokens[-1].endswith(_SENTENCE_END):
                tokens[-1] += "…"
        break
    if with_tag:
        tokens.extend(tag_tokens)
    return tuple(tokens)
