"""An OpenAI-compatible fake model server.

Used when no LLM key is configured, by the tests and by the benchmarks. It speaks the
`/v1/chat/completions` protocol (streamed and not), paces tokens like a real model and
injects the failures real providers produce: 429 with Retry-After, 500, a request that
hangs, a stream cut mid-way, a slow first token. Faults come from random rates in the
config, from a FIFO queue filled through `POST /_sim/faults`, or from inline directives
in the last user message (`[[sim:fault=cut]]`), which lets an end-to-end test steer one
message through the whole service. `[[sim:tag=X]]` records when the request arrived and
when its first token went out (`GET /_sim/timings`), so a benchmark can take the
simulator's own delays out of what it charges to the service.

Offered `tools`, it calls the one that fits the shopper's message and then answers from
the tool results, in OpenAI's tool-calling format; asked for `response_format:
json_object`, it classifies the message (simulator_modes), so the specialists' tool loop
and the router's LLM stage run for real without a model.

It shares a small machine with the service under load, so it does little per request:
replies are generated once per distinct question and cached, pacing is `asyncio.sleep`,
and fast token rates are batched so a stream writes at most about every 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from orchestration.llm import simulator_modes as modes
from orchestration.llm.simulator_modes import SimToolCall
from orchestration.llm.tokens import estimate_messages_tokens
from orchestration.llm.types import ChatMessage

FAULTS = ("429", "500", "hang", "cut", "slow")

# A stream writes at most once per this many seconds; faster token rates are batched.
_MIN_WRITE_GAP_S = 0.010
# First-token delay of a queued "slow" fault that does not say how slow.
_SLOW_DEFAULT_MS = 5000.0
# A hung request gives up on its own after this long, so nothing lingers forever.
_HANG_MAX_S = 600.0
_MAX_TIMINGS = 200_000
# Longest reply, whatever a directive or the config asks for (replies are cached).
_MAX_REPLY_TOKENS = 32_768
# Long waits check this often whether the client is still there.
_POLL_S = 0.2


@dataclass
class SimulatorConfig:
    first_token_ms: float = 300
    tokens_per_second: float = 50  # 0 or less: no pacing, the whole reply at once
    reply_tokens: int = 40
    fail_rate: float = 0  # probability of a 500
    rate_limit_rate: float = 0  # probability of a 429
    hang_rate: float = 0  # probability of accepting and never answering
    cut_rate: float = 0  # probability of closing the stream half-way, without [DONE]
    retry_after_s: float = 1
    seed: int | None = None


_RATE_FIELDS = ("fail_rate", "rate_limit_rate", "hang_rate", "cut_rate")


@dataclass
class SimulatorStats:
    requests: int = 0  # chat completion requests that were well-formed
    completed: int = 0  # replies sent in full
    disconnected: int = 0  # clients that went away mid-reply
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active: int = 0  # requests being served right now
    peak_active: int = 0  # most requests served at once (shows calls ran in parallel)
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULTS, 0))

    def reset(self) -> None:
        fresh = SimulatorStats()
        for f in dataclasses.fields(self):
            if f.name != "active":  # in-flight requests are still in flight
                setattr(self, f.name, getattr(fresh, f.name))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str
    retry_after: float | None = None
    first_token_ms: float | None = None


@dataclass(slots=True)
class _Plan:
    """How one request will be answered."""

    fault: str | None
    retry_after: float
    first_token_s: float
    tokens_per_second: float
    reply_tokens: int
    tag: str | None = None
    arrived: float = 0.0  # time.perf_counter() when the request came in


class _State:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.initial = dataclasses.replace(config)
        self.stats = SimulatorStats()
        self.queue: deque[_Fault] = deque()
        self.rng = random.Random(config.seed)
        self.ids = itertools.count(1)
        self.closing = False
        # [[sim:tag=X]] -> (arrived, first token written), perf_counter seconds
        self.timings: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        for f in dataclasses.fields(self.config):
            setattr(self.config, f.name, getattr(self.initial, f.name))
        self.stats.reset()
        self.queue.clear()
        self.timings.clear()
        self.rng = random.Random(self.config.seed)

    def record_timing(self, tag: str, arrived: float) -> None:
        if len(self.timings) >= _MAX_TIMINGS:
            del self.timings[next(iter(self.timings))]  # the oldest
        self.timings[tag] = (arrived, time.perf_counter())

    def plan(self, directives: dict[str, str]) -> _Plan:
        """Queued fault first, then an inline one, then the configured random rates."""
        cfg = self.config
        fault: _Fault | None = None
        if self.queue:
            fault = self.queue.popleft()
        elif directives.get("fault") in FAULTS:
            fault = _Fault(directives["fault"])
        elif any(getattr(cfg, name) > 0 for name in _RATE_FIELDS):
            r = self.rng.random()
            for name, kind in zip(_RATE_FIELDS, ("500", "429", "hang", "cut"), strict=True):
                rate: float = getattr(cfg, name)
                if r < rate:
                    fault = _Fault(kind)
                    break
                r -= rate

        first_token_ms = cfg.first_token_ms
        if fault is not None and fault.kind == "slow":
            first_token_ms = (
                fault.first_token_ms if fault.first_token_ms is not None else _SLOW_DEFAULT_MS
            )
        retry_after = cfg.retry_after_s
        if fault is not None and fault.retry_after is not None:
            retry_after = fault.retry_after
        plan = _Plan(
            fault=fault.kind if fault else None,
            retry_after=_number(directives.get("retry_after"), retry_after),
            first_token_s=_number(directives.get("delay_ms"), first_token_ms) / 1000,
            tokens_per_second=_number(directives.get("tps"), cfg.tokens_per_second),
            reply_tokens=min(
                _MAX_REPLY_TOKENS, int(_number(directives.get("tokens"), cfg.reply_tokens))
            ),
            tag=directives.get("tag") or None,
        )
        if plan.fault is not None:
            self.stats.faults[plan.fault] += 1
        return plan


_STATE = web.AppKey("swarmdesk_simulator_state", _State)


def _number(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return number if number >= 0 and math.isfinite(number) else default


# --- inline directives ------------------------------------------------------------------

_DIRECTIVE_RE = re.compile(r"\[\[sim:([^\[\]]*)\]\]")
_DIRECTIVE_SPLIT_RE = re.compile(r"[,;\s]+")


def parse_directives(text: str) -> tuple[dict[str, str], str]:
    """(`[[sim:key=value]]` settings, the text without them). Later settings win."""
    if "[[sim:" not in text:
        return {}, text
    found: dict[str, str] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        for item in _DIRECTIVE_SPLIT_RE.split(match.group(1)):
            key, sep, value = item.partition("=")
            if sep:
                found[key.strip().lower()] = value.strip()
    return found, _DIRECTIVE_RE.sub("", text)


# --- reply text -------------------------------------------------------------------------

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


def _mostly_chinese(text: str) -> bool:
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    if not han:
        return False
    latin = sum(1 for c in text if c.isascii() and c.isalpha())
    return han * 3 >= latin  # one hanzi carries about as much as a few letters


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
    chinese = _mostly_chinese(question)
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


# --- HTTP handlers ----------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    err_type: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **more: Any,
) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": err_type, "param": None, "code": code}
    error.update(more)
    return web.json_response({"error": error}, status=status, headers=headers)


def _content_text(content: Any) -> str:
    """Message content as text; list content (text + image parts) keeps its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _parse_messages(body: Any) -> list[ChatMessage] | str:
    """The request's messages, or what is wrong with the request."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        return "'messages' must be a non-empty array."
    messages: list[ChatMessage] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            return "Each message must be an object with a 'role'."
        messages.append(ChatMessage(item["role"], _content_text(item.get("content"))))
    return messages


def _seconds_header(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


def _close(request: web.Request) -> None:
    """Drop the connection mid-response, the way a crashing upstream does."""
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then FIN: an unfinished chunked body


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    arrived = time.perf_counter()
    state = request.app[_STATE]
    try:
        body = await request.json()
    except ValueError:
        return _error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error"
        )
    messages = _parse_messages(body)
    if isinstance(messages, str):
        return _error(400, messages, "invalid_request_error")
    problem = modes.check_request(body)
    if problem is not None:
        return _error(400, problem, "invalid_request_error")

    stats = state.stats
    stats.requests += 1
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    directives, question = parse_directives(last_user)
    plan = state.plan(directives)
    plan.arrived = arrived

    if plan.fault == "429":
        wait = _seconds_header(plan.retry_after)
        return _error(
            429,
            f"Rate limit reached for requests (simulated). Please try again in {wait}s.",
            "requests",
            "rate_limit_exceeded",
            headers={"Retry-After": wait},
            retry_after=plan.retry_after,
        )
    if plan.fault == "500":
        return _error(
            500,
            "The server had an error while processing your request (simulated).",
            "server_error",
        )

    stats.active += 1
    stats.peak_active = max(stats.peak_active, stats.active)
    try:
        if plan.fault == "hang":
            # Say nothing until the client gives up (or the simulator stops).
            await _wait(request, state, _HANG_MAX_S)
            return web.Response(status=504)  # only reached on shutdown or after _HANG_MAX_S

        n_tokens = plan.reply_tokens
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        reply_number = next(state.ids)
        # Tool calls, an answer from tool results or JSON; else the canned reply.
        special = modes.special_reply(body, question, f"call_sim{reply_number}")
        if special is None:
            if isinstance(limit, int) and 0 < limit < n_tokens:
                n_tokens, finish_reason = limit, "length"
            tokens = reply_tokens(" ".join(question.split()), n_tokens, state.config.seed)
        else:
            tokens = special.tokens
            if isinstance(limit, int) and 0 < limit < len(tokens):
                tokens, finish_reason = tokens[:limit], "length"
        prompt_tokens = estimate_messages_tokens(messages) + modes.prompt_overhead(body)
        stats.prompt_tokens += prompt_tokens
        model = str(body.get("model") or "simulator")
        reply_id = f"chatcmpl-sim{reply_number}"
        if special is not None and special.calls:
            if body.get("stream"):
                options = body.get("stream_options")
                return await _stream_tool_calls(
                    request,
                    state,
                    plan,
                    special.calls,
                    model,
                    reply_id,
                    prompt_tokens,
                    include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
                )
            return await _whole_tool_calls(
                request, state, plan, special, model, reply_id, prompt_tokens
            )

        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await _stream(
                request,
                state,
                plan,
                tokens,
                model,
                reply_id,
                prompt_tokens,
                finish_reason,
                include_usage=include_usage,
            )
        return await _whole(
            request, state, plan, tokens, model, reply_id, prompt_tokens, finish_reason
        )
    finally:
        stats.active -= 1


async def _wait(request: web.Request, state: _State, seconds: float) -> bool:
    """Sleep; False if the client hung up or the simulator is stopping meanwhile.

    Short waits are one plain sleep (the common case under load); long ones (slow and
    hung requests) wake up now and then, so an abandoned request ends soon after its
    client gave up instead of holding a task until the full delay is over.
    """
    if seconds <= _POLL_S:
        await asyncio.sleep(seconds)
        return not state.closing
    deadline = time.monotonic() + seconds
    while True:
        transport = request.transport
        if state.closing or transport is None or transport.is_closing():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, _POLL_S))


async def _whole(
    request: web.Request,
    state: _State,
    plan: _Plan,
    tokens: tuple[str, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    finish_reason: str,
) -> web.StreamResponse:
    """A non-streamed completion: the same latency, the answer in one body."""
    generation_s = len(tokens) / plan.tokens_per_second if plan.tokens_per_second > 0 else 0
    if not await _wait(request, state, plan.first_token_s + generation_s):
        return web.Response(status=503)  # nobody is listening any more
    if plan.fault == "cut":
        _close(request)
        return web.Response(status=502)  # never reaches the client
    state.stats.completed += 1
    state.stats.completion_tokens += len(tokens)
    return web.json_response(
        {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_swarmdesk_sim",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(prompt_tokens, len(tokens)),
        }
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What every chunk of one streamed reply shares; only the delta part changes."""

    reply_id: str
    model: str
    include_usage: bool

    @property
    def _created(self) -> str:
        return (
            f'data: {{"id":"{self.reply_id}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(self.model)},'
            f'"system_fingerprint":"fp_swarmdesk_sim","choices":'
        )

    def parts(self) -> tuple[str, str]:
        """(head, tail) of a chunk: a delta's JSON goes in between."""
        usage_null = ',"usage":null' if self.include_usage else ""
        head = f'{self._created}[{{"index":0,"delta":'
        return head, f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'

    def end(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> str:
        """The finish chunk, the usage chunk if asked for, and [DONE]."""
        head, tail = self.parts()
        out = [
            head + "{}" + tail.replace('"finish_reason":null', f'"finish_reason":"{finish_reason}"')
        ]
        if self.include_usage:
            usage = json.dumps(_usage(prompt_tokens, completion_tokens), separators=(",", ":"))
            out.append(f'{self._created}[],"usage":{usage}}}\n\n')
        out.append("data: [DONE]\n\n")
        return "".join(out)


async def _stream(
    request: web.Request,
    state: _State,
    plan: _Plan,
    tokens: tuple[str, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    finish_reason: str,
    *,
    include_usage: bool,
) -> web.StreamResponse:
    """SSE in OpenAI's chunk format; several tokens share a chunk when the rate is high."""
    envelope = _Envelope(reply_id, model, include_usage)
    head, tail = envelope.parts()
    role_chunk = f'{head}{{"role":"assistant","content":""}}{tail}'

    def render(sent: int, upto: int) -> str:
        content = json.dumps("".join(tokens[sent:upto]), ensure_ascii=False)
        return (role_chunk if sent == 0 else "") + f'{head}{{"content":{content}}}{tail}'

    steps = len(tokens)
    if plan.fault == "cut":
        steps = len(tokens) // 2 if len(tokens) > 1 else 0
    return await _paced(request, state, plan, envelope, steps, render, finish_reason, prompt_tokens)


async def _paced(
    request: web.Request,
    state: _State,
    plan: _Plan,
    envelope: _Envelope,
    steps: int,
    render: Callable[[int, int], str],
    finish_reason: str,
    prompt_tokens: int,
) -> web.StreamResponse:
    """Stream `steps` steps (tokens, tool-call pieces) at the plan's pace: every step due by
    now goes out in one write of `render(first, end)`; then the end (or the planned cut)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    interval = 1 / plan.tokens_per_second if plan.tokens_per_second > 0 else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time() + plan.first_token_s
    sent = 0
    try:
        if not await _wait(request, state, plan.first_token_s):
            state.stats.disconnected += 1
            return response
        while sent < steps and not state.closing:
            due = steps if interval == 0 else int((loop.time() - start) / interval) + 1
            upto = min(steps, max(sent + 1, due))
            await response.write(render(sent, upto).encode())
            if sent == 0 and plan.tag is not None:
                state.record_timing(plan.tag, plan.arrived)
            state.stats.completion_tokens += upto - sent
            sent = upto
            if sent < steps:
                wait = start + sent * interval - loop.time()
                await asyncio.sleep(max(wait, _MIN_WRITE_GAP_S))

        if plan.fault == "cut" or state.closing:
            _close(request)
            return response
        await response.write(envelope.end(finish_reason, prompt_tokens, sent).encode())
        state.stats.completed += 1
    except ConnectionError:
        state.stats.disconnected += 1  # the client gave up; nothing left to do
    return response


def _tool_call_deltas(
    calls: tuple[SimToolCall, ...], steps: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """Deltas for paced steps (call index, piece number; -1 is the call's header).

    Consecutive pieces of one call share a delta, as a provider batches them; a header
    opens each call with its index, id, type and name, like OpenAI's first chunk of a call.
    """
    deltas: list[dict[str, Any]] = []
    for index, piece in steps:
        call = calls[index]
        if piece < 0:
            entry = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            delta: dict[str, Any] = {"tool_calls": [entry]}
            if index == 0:
                delta = {"role": "assistant", "content": None, **delta}
            deltas.append(delta)
            continue
        last = deltas[-1]["tool_calls"][0] if deltas else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += call.pieces[piece]
        else:
            entry = {"index": index, "function": {"arguments": call.pieces[piece]}}
            deltas.append({"tool_calls": [entry]})
    return deltas


async def _stream_tool_calls(
    request: web.Request,
    state: _State,
    plan: _Plan,
    calls: tuple[SimToolCall, ...],
    model: str,
    reply_id: str,
    prompt_tokens: int,
    *,
    include_usage: bool,
) -> web.StreamResponse:
    """Tool calls in OpenAI's streaming shape, paced like text: each call's header, then
    its arguments in pieces; finish_reason "tool_calls", then the usage chunk."""
    envelope = _Envelope(reply_id, model, include_usage)
    head, tail = envelope.parts()
    steps = [(i, p) for i, call in enumerate(calls) for p in range(-1, len(call.pieces))]

    def render(sent: int, upto: int) -> str:
        return "".join(
            f"{head}{json.dumps(d, ensure_ascii=False, separators=(',', ':'))}{tail}"
            for d in _tool_call_deltas(calls, steps[sent:upto])
        )

    count = len(steps) // 2 if plan.fault == "cut" else len(steps)
    return await _paced(request, state, plan, envelope, count, render, "tool_calls", prompt_tokens)


async def _whole_tool_calls(
    request: web.Request,
    state: _State,
    plan: _Plan,
    reply: modes.Reply,
    model: str,
    reply_id: str,
    prompt_tokens: int,
) -> web.StreamResponse:
    """Tool calls in a non-streamed completion, after the same latency as a stream."""
    n_tokens = reply.completion_tokens
    generation_s = n_tokens / plan.tokens_per_second if plan.tokens_per_second > 0 else 0
    if not await _wait(request, state, plan.first_token_s + generation_s):
        return web.Response(status=503)
    if plan.fault == "cut":
        _close(request)
        return web.Response(status=502)
    state.stats.completed += 1
    state.stats.completion_tokens += n_tokens
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": modes.tool_calls_json(reply.calls),
        "refusal": None,
    }
    return web.json_response(
        {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_swarmdesk_sim",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
            ],
            "usage": _usage(prompt_tokens, n_tokens),
        }
    )


async def _models(request: web.Request) -> web.Response:
    created = 1_700_000_000
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "swarmdesk-sim"}
                for name in ("sim-cheap", "sim-premium", "simulator")
            ],
        }
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid JSON", "invalid_request_error")
    if not isinstance(body, dict):
        return _error(400, "expected a JSON object", "invalid_request_error")
    return body


async def _queue_faults(request: web.Request) -> web.Response:
    """Queue `count` faults of one kind for the next requests, FIFO."""
    state = request.app[_STATE]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    kind = str(body.get("fault", ""))
    if kind not in FAULTS:
        return _error(400, f"'fault' must be one of {', '.join(FAULTS)}", "invalid_request_error")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 100_000:
        return _error(400, "'count' must be an integer from 0 to 100000", "invalid_request_error")
    try:
        retry_after = _optional_number(body.get("retry_after"))
        first_token_ms = _optional_number(body.get("first_token_ms"))
    except ValueError as exc:
        return _error(400, str(exc), "invalid_request_error")
    fault = _Fault(kind, retry_after=retry_after, first_token_ms=first_token_ms)
    state.queue.extend(itertools.repeat(fault, count))
    return web.json_response({"queued": len(state.queue)})


def _optional_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a non-negative number, got {value!r}")
    return float(value)


async def _update_config(request: web.Request) -> web.Response:
    """Change SimulatorConfig fields at runtime; unknown fields or bad values are a 400."""
    state = request.app[_STATE]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    updates: dict[str, Any] = {}
    for key, value in body.items():
        if key not in names:
            return _error(400, f"unknown config field {key!r}", "invalid_request_error")
        try:
            updates[key] = _config_value(key, value)
        except ValueError as exc:
            return _error(400, f"{key}: {exc}", "invalid_request_error")
    for key, value in updates.items():
        setattr(state.config, key, value)
    if "seed" in updates:
        state.rng = random.Random(state.config.seed)
    return web.json_response(dataclasses.asdict(state.config))


def _config_value(key: str, value: Any) -> Any:
    if key == "seed":
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError("must be an integer or null")
    number = _optional_number(value)
    if number is None:
        raise ValueError("must be a number")
    if key in _RATE_FIELDS and number > 1:
        raise ValueError("must be a probability from 0 to 1")
    if key == "reply_tokens":
        if number != int(number) or number > _MAX_REPLY_TOKENS:
            raise ValueError(f"must be an integer up to {_MAX_REPLY_TOKENS}")
        return int(number)
    return number


async def _get_stats(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    data = state.stats.as_dict()
    data["queued"] = [f.kind for f in state.queue]
    return web.json_response(data)


async def _get_timings(request: web.Request) -> web.Response:
    """{tag: [arrived, first token written]} of `[[sim:tag=X]]` requests (perf_counter
    seconds, comparable across processes on one machine), cleared by reading them."""
    state = request.app[_STATE]
    data, state.timings = state.timings, {}
    return web.json_response(data)


async def _reset(request: web.Request) -> web.Response:
    """Back to the configuration the simulator started with; stats and queue cleared."""
    request.app[_STATE].reset()
    return web.json_response({"status": "reset"})


async def _on_shutdown(app: web.Application) -> None:
    app[_STATE].closing = True  # lets hung and streaming requests end promptly


def build_simulator_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app; `config` is used live, not copied."""
    app = web.Application()
    app[_STATE] = _State(config)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/_sim/faults", _queue_faults)
    app.router.add_post("/_sim/config", _update_config)
    app.router.add_get("/_sim/stats", _get_stats)
    app.router.add_get("/_sim/timings", _get_timings)
    app.router.add_post("/_sim/reset", _reset)
    app.on_shutdown.append(_on_shutdown)
    return app


class Simulator:
    """Runs the simulator inside the current event loop (tests, benchmarks, dev mode)."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.app = build_simulator_app(self.config)
        self._state = self.app[_STATE]
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def stats(self) -> SimulatorStats:
        return self._state.stats

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0 picks a free port); returns the `/v1` base URL."""
        if self._runner is not None:
            return self.base_url
        self._state.closing = False
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            self._state.closing = True
            await self._runner.cleanup()
            self._runner = None

    def queue_fault(
        self,
        fault: str,
        count: int = 1,
        *,
        retry_after: float | None = None,
        first_token_ms: float | None = None,
    ) -> None:
        """The same as `POST /_sim/faults`, without HTTP."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        item = _Fault(fault, retry_after=retry_after, first_token_ms=first_token_ms)
        self._state.queue.extend(itertools.repeat(item, count))

    def reset(self) -> None:
        """The same as `POST /_sim/reset`."""
        self._state.reset()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def run_standalone(host: str, port: int, config: SimulatorConfig) -> None:
    """Serve the simulator until interrupted (blocking)."""

    def announce(message: object) -> None:
        print(message, flush=True)
        print(f"OpenAI base URL: http://{host}:{port}/v1", flush=True)

    web.run_app(
        build_simulator_app(config),
        host=host,
        port=port,
        access_log=None,
        shutdown_timeout=1.0,
        print=announce,
    )


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.llm.simulator",
        description="OpenAI-compatible fake model server for swarmdesk.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--first-token-ms", type=float, default=defaults.first_token_ms)
    parser.add_argument("--tps", type=float, default=defaults.tokens_per_second)
    parser.add_argument("--reply-tokens", type=int, default=defaults.reply_tokens)
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    parser.add_argument("--rate-limit-rate", type=float, default=defaults.rate_limit_rate)
    parser.add_argument("--hang-rate", type=float, default=defaults.hang_rate)
    parser.add_argument("--cut-rate", type=float, default=defaults.cut_rate)
    parser.add_argument("--retry-after", type=float, default=defaults.retry_after_s)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        first_token_ms=args.first_token_ms,
        tokens_per_second=args.tps,
        reply_tokens=args.reply_tokens,
        fail_rate=args.fail_rate,
        rate_limit_rate=args.rate_limit_rate,
        hang_rate=args.hang_rate,
        cut_rate=args.cut_rate,
        retry_after_s=args.retry_after,
        seed=args.seed,
    )
    run_standalone(args.host, args.port, config)


if __name__ == "__main__":
    main()
