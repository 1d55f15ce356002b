"""The streaming LLM client against real HTTP servers: the simulator and tiny fakes."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from orchestration.llm.client import ProviderClient
from orchestration.llm.tokens import (
    estimate_messages_tokens,
    estimate_tokens,
    trim_history,
)
from orchestration.llm.types import ChatMessage, ErrorKind, LLMError
from simulator.config import SimulatorConfig
from simulator.faults import parse_directives
from simulator.server import Simulator
from simulator.text import reply_tokens

QUESTION = "Where is my order #1234? It was supposed to arrive yesterday."
MESSAGES = [
    ChatMessage("system", "You are a helpful shop assistant."),
    ChatMessage("user", QUESTION),
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(
        SimulatorConfig(first_token_ms=5, tokens_per_second=400, reply_tokens=24, seed=7)
    )
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[ProviderClient]:
    async with ProviderClient("sim", sim.base_url, "test-key", first_token_timeout_s=5) as c:
        yield c


@pytest.fixture
async def control(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP access to the simulator's root, for its /_sim endpoints."""
    root = sim.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root) as http:
        yield http


@contextlib.asynccontextmanager
async def fake_provider(handler: Handler) -> AsyncIterator[str]:
    """A one-route OpenAI look-alike on a free port; yields its /v1 base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def delta_chunk(content: str | None, finish_reason: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def fails_with(stream_coro: Awaitable[object]) -> LLMError:
    with pytest.raises(LLMError) as info:
        await stream_coro
    return info.value


# --- the happy path ---------------------------------------------------------------------


async def test_stream_arrives_in_deltas_with_stats(client: ProviderClient) -> None:
    deltas: list[str] = []
    async with client.stream_chat("sim-cheap", MESSAGES, temperature=0.2) as stream:
        async for delta in stream:
            deltas.append(delta)

    stats = stream.stats
    assert len(deltas) > 1
    assert all(deltas)
    assert "".join(deltas) == stats.text == stream.text
    assert stats.text == "".join(reply_tokens(QUESTION, 24, 7))
    assert stats.finish_reason == "stop"
    assert stats.usage.estimated is False
    assert stats.usage.output_tokens == 24
    assert stats.usage.input_tokens == estimate_messages_tokens(MESSAGES)
    assert stats.first_token_s is not None and stats.total_s is not None
    assert 0 < stats.first_token_s <= stats.total_s
    assert (stats.model, stats.provider) == ("sim-cheap", "sim")


async def test_complete_chat_drains_the_stream(client: ProviderClient) -> None:
    text, stats = await client.complete_chat("sim-cheap", MESSAGES)
    assert text == stats.text
    assert "order #1234" in text  # the reply quotes the shopper's question
    assert stats.usage.output_tokens == 24


async def test_reply_is_deterministic_and_follows_the_language(client: ProviderClient) -> None:
    first, _ = await client.complete_chat("m", MESSAGES)
    again, _ = await client.complete_chat("m", MESSAGES)
    assert first == again

    chinese, _ = await client.complete_chat("m", [ChatMessage("user", "我的订单什么时候发货？")])
    assert "订单什么时候发货" in chinese
    assert estimate_tokens(chinese) > 0
    assert sum("\u4e00" <= c <= "\u9fff" for c in chinese) > len(chinese) // 2


async def test_max_tokens_truncates_with_length_finish(client: ProviderClient) -> None:
    _, stats = await client.complete_chat("m", MESSAGES, max_tokens=5)
    assert stats.usage.output_tokens == 5
    assert stats.finish_reason == "length"


async def test_stream_without_usage_chunk_gets_estimated_usage(client: ProviderClient) -> None:
    # Without stream_options the simulator, like OpenAI, sends no usage chunk.
    text, stats = await client.complete_chat("m", MESSAGES, extra={"stream_options": None})
    assert stats.usage.estimated is True
    assert stats.usage.output_tokens == estimate_tokens(text)
    assert stats.usage.input_tokens == estimate_messages_tokens(MESSAGES)


async def test_server_ignoring_stream_flag_still_works(client: ProviderClient) -> None:
    text, stats = await client.complete_chat("m", MESSAGES, extra={"stream": False})
    assert text == "".join(reply_tokens(QUESTION, 24, 7))
    assert stats.usage.output_tokens == 24 and not stats.usage.estimated
    assert stats.finish_reason == "stop"


# --- faults from the simulator ----------------------------------------------------------


async def test_rate_limit_carries_retry_after(sim: Simulator, client: ProviderClient) -> None:
    sim.config.retry_after_s = 3
    sim.queue_fault("429")
    err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.RATE_LIMIT
    assert err.status == 429
    assert err.retry_after == 3

    sim.queue_fault("429", retry_after=0.5)
    err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.retry_after == 0.5


async def test_server_error(sim: Simulator, client: ProviderClient) -> None:
    sim.queue_fault("500")
    err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.SERVER
    assert err.status == 500
    assert err.kind.retryable


async def test_hang_times_out_waiting_for_first_token(sim: Simulator) -> None:
    sim.queue_fault("hang")
    async with ProviderClient("sim", sim.base_url, None, first_token_timeout_s=0.5) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.TIMEOUT
    assert err.partial_text == ""


async def test_slow_first_token_times_out(sim: Simulator) -> None:
    sim.queue_fault("slow", first_token_ms=10_000)
    async with ProviderClient("sim", sim.base_url, None, first_token_timeout_s=0.3) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.TIMEOUT


async def test_cut_stream_keeps_partial_text(sim: Simulator, client: ProviderClient) -> None:
    full, _ = await client.complete_chat("m", MESSAGES)
    sim.queue_fault("cut")
    stream = client.stream_chat("m", MESSAGES)
    received: list[str] = []
    with pytest.raises(LLMError) as info:
        async for delta in stream:
            received.append(delta)
    err = info.value
    assert err.kind is ErrorKind.STREAM_CUT
    assert err.partial_text
    assert err.partial_text == "".join(received) == stream.stats.text
    assert full.startswith(err.partial_text) and full != err.partial_text
    # The provider billed what it sent; no usage chunk came, so it is estimated.
    assert stream.stats.usage.estimated


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with ProviderClient("gone", f"http://127.0.0.1:{port}/v1", None) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.CONNECTION


# --- faults from tiny fake providers ----------------------------------------------------


async def test_unauthorized_is_auth() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(
            {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
            status=401,
        )

    async with fake_provider(handler) as url, ProviderClient("p", url, "sk-wrong") as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.AUTH
    assert not err.kind.retryable
    assert "Incorrect API key" in err.detail
    assert seen == ["Bearer sk-wrong"]


async def test_bad_request_includes_provider_message() -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        message = "This model's maximum context length is 8192 tokens."
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": None}},
            status=400,
        )

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.BAD_REQUEST
    assert err.status == 400
    assert "maximum context length is 8192" in err.detail


async def test_retry_after_as_http_date_and_in_body() -> None:
    replies = [
        web.json_response(
            {"error": {"message": "slow down"}},
            status=429,
            headers={"Retry-After": email.utils.formatdate(time.time() + 120, usegmt=True)},
        ),
        web.json_response({"error": {"message": "slow down", "retry_after": 7}}, status=429),
    ]

    async def handler(request: web.Request) -> web.Response:
        return replies.pop(0)

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        by_date = await fails_with(client.complete_chat("m", MESSAGES))
        by_body = await fails_with(client.complete_chat("m", MESSAGES))
    assert by_date.kind is ErrorKind.RATE_LIMIT
    assert by_date.retry_after is not None and 100 < by_date.retry_after <= 120
    assert by_body.retry_after == 7


async def test_clean_eof_without_done_is_a_cut() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(delta_chunk("Hello")) + sse(delta_chunk(" there")))
        return response  # a well-formed end of body, but no finish_reason and no [DONE]

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.STREAM_CUT
    assert err.partial_text == "Hello there"


async def test_finish_reason_without_done_is_complete() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(b": keep-alive\n\n" + sse(delta_chunk("Hi")))
        await response.write(b"data:" + json.dumps(delta_chunk(None, "stop")).encode() + b"\n\n")
        return response

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        text, stats = await client.complete_chat("m", MESSAGES)
    assert text == "Hi"
    assert stats.finish_reason == "stop"
    assert stats.usage.estimated


async def test_events_split_across_and_packed_into_writes() -> None:
    """A provider's TCP writes need not match SSE events: a line cut in two (even inside a
    multi-byte character), several events in one write, CRLF line ends."""
    first = f"data: {json.dumps(delta_chunk('你好'), ensure_ascii=False)}\n\n".encode()
    cut = first.index("好".encode()) + 1  # inside the character's UTF-8 bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(first[:cut])
        await asyncio.sleep(0.05)
        await response.write(first[cut:] + sse(delta_chunk(", ")) + sse(delta_chunk("world")))
        await asyncio.sleep(0.05)
        tail = sse(delta_chunk(None, "stop")) + b"data: [DONE]\n\n"
        await response.write(tail.replace(b"\n", b"\r\n"))
        return response

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        async with client.stream_chat("m", MESSAGES) as stream:
            deltas = [d async for d in stream]
    assert "".join(deltas) == "你好, world"
    assert deltas[0] == "你好"  # the first token as soon as its line is whole
    assert stream.stats.finish_reason == "stop"


async def test_endless_sse_line_is_a_server_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(delta_chunk("Hi")))
        for _ in range(40):  # 1.3 MB without a line end
            await response.write(b"x" * 32768)
        return response

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.SERVER
    assert err.partial_text == "Hi"


async def test_mid_stream_read_timeout_keeps_partial_text() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(delta_chunk("Partial answer")))
        await release.wait()  # stall until the test is over
        return response

    async with (
        fake_provider(handler) as url,
        ProviderClient("p", url, None, timeout_s=0.3) as client,
    ):
        err = await fails_with(client.complete_chat("m", MESSAGES))
        release.set()
    assert err.kind is ErrorKind.TIMEOUT
    assert err.partial_text == "Partial answer"


async def test_slow_but_steady_stream_outlives_the_read_timeout() -> None:
    """The read timeout is about silence, not length: pieces 0.15 s apart over 1.2 s pass
    a 0.3 s timeout."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        for word in ["one", " two", " three", " four", " five", " six", " seven", " eight"]:
            await response.write(sse(delta_chunk(word)))
            await asyncio.sleep(0.15)
        await response.write(sse(delta_chunk(None, "stop")) + b"data: [DONE]\n\n")
        return response

    async with (
        fake_provider(handler) as url,
        ProviderClient("p", url, None, timeout_s=0.3) as client,
    ):
        text, stats = await client.complete_chat("m", MESSAGES)
    assert text == "one two three four five six seven eight"
    assert stats.finish_reason == "stop"


async def test_error_event_inside_the_stream() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(delta_chunk("Let me")))
        await response.write(sse({"error": {"message": "overloaded", "type": "server_error"}}))
        return response

    async with fake_provider(handler) as url, ProviderClient("p", url, None) as client:
        err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.SERVER
    assert "overloaded" in err.detail
    assert err.partial_text == "Let me"


# --- the response is released on every path --------------------------------------------


@contextlib.asynccontextmanager
async def endless_provider() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Streams deltas forever; the event is set once the client has hung up."""
    gone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        try:
            while True:
                await response.write(sse(delta_chunk("tick ")))
                await asyncio.sleep(0.02)
        except ConnectionError:
            gone.set()
        return response

    async with fake_provider(handler) as url:
        yield url, gone


async def test_early_break_without_async_with_releases_the_response() -> None:
    async with endless_provider() as (url, gone), ProviderClient("p", url, None) as client:
        stream = client.stream_chat("m", MESSAGES)
        async for _ in stream:
            break
        del stream  # dropping an abandoned stream finalizes it
        await asyncio.wait_for(gone.wait(), 5)


async def test_break_inside_async_with_releases_the_response() -> None:
    async with endless_provider() as (url, gone), ProviderClient("p", url, None) as client:
        async with client.stream_chat("m", MESSAGES) as stream:
            async for _ in stream:
                break
        assert stream.stats.total_s is not None
        assert stream.stats.text == "tick "
        await asyncio.wait_for(gone.wait(), 5)


async def test_cancellation_releases_the_response() -> None:
    async with endless_provider() as (url, gone), ProviderClient("p", url, None) as client:
        started = asyncio.Event()

        async def consume() -> None:
            async with client.stream_chat("m", MESSAGES) as stream:
                async for _ in stream:
                    started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 5)


# --- steering the simulator -------------------------------------------------------------


async def test_inline_directives(client: ProviderClient) -> None:
    def ask(text: str) -> list[ChatMessage]:
        return [ChatMessage("user", text)]

    text, stats = await client.complete_chat("m", ask("Short please [[sim:tokens=7]]"))
    assert stats.usage.output_tokens == 7
    assert "[[sim:" not in text

    err = await fails_with(client.complete_chat("m", ask("Hi [[sim:fault=500]]")))
    assert err.kind is ErrorKind.SERVER

    err = await fails_with(
        client.complete_chat("m", ask("[[sim:fault=429]] hi [[sim:retry_after=4]]"))
    )
    assert (err.kind, err.retry_after) == (ErrorKind.RATE_LIMIT, 4)

    err = await fails_with(client.complete_chat("m", ask("Hi [[sim:fault=cut]] [[sim:tokens=30]]")))
    assert err.kind is ErrorKind.STREAM_CUT and err.partial_text

    _, stats = await client.complete_chat("m", ask("Fast [[sim:tps=5000]] [[sim:tokens=60]]"))
    assert stats.usage.output_tokens == 60

    # Only the last user message steers: an old directive in the history does nothing.
    history = [ChatMessage("user", "[[sim:fault=500]]"), ChatMessage("user", "and now?")]
    text, _ = await client.complete_chat("m", history)
    assert text


async def test_inline_first_token_delay(sim: Simulator) -> None:
    slow = [ChatMessage("user", "Anyone there? [[sim:delay_ms=3000]]")]
    async with ProviderClient("sim", sim.base_url, None, first_token_timeout_s=0.3) as client:
        err = await fails_with(client.complete_chat("m", slow))
    assert err.kind is ErrorKind.TIMEOUT


async def test_tagged_calls_report_their_timing(
    client: ProviderClient, control: httpx.AsyncClient
) -> None:
    """A benchmark tags its model calls to take the simulator's own time out of the
    service's: the simulator says when each tagged request came in and when its first token
    went out (perf_counter seconds, the same clock as the caller's on this machine)."""
    before = time.perf_counter()
    text, _ = await client.complete_chat("m", [ChatMessage("user", "Hi [[sim:tag=m-1]]")])
    await client.complete_chat("m", [ChatMessage("user", "Untagged")])
    after = time.perf_counter()
    assert "[[sim:" not in text
    timings = (await control.get("/_sim/timings")).json()
    assert list(timings) == ["m-1"]
    arrived, first_out = timings["m-1"]
    assert before <= arrived <= first_out <= after
    assert first_out - arrived >= 0.005  # the configured first-token delay
    assert (await control.get("/_sim/timings")).json() == {}  # reading clears them


def test_parse_directives() -> None:
    found, rest = parse_directives("Hi [[sim:fault=cut]] there [[sim:tokens=5, tps=9]]")
    assert found == {"fault": "cut", "tokens": "5", "tps": "9"}
    assert rest == "Hi  there "
    assert parse_directives("plain") == ({}, "plain")


async def test_queued_faults_are_fifo_and_count_down(
    client: ProviderClient, control: httpx.AsyncClient
) -> None:
    r = await control.post("/_sim/faults", json={"fault": "500", "count": 2})
    assert r.status_code == 200
    r = await control.post("/_sim/faults", json={"fault": "429", "count": 1, "retry_after": 2})
    assert r.json() == {"queued": 3}
    assert (await control.get("/_sim/stats")).json()["queued"] == ["500", "500", "429"]

    kinds = []
    for _ in range(3):
        kinds.append((await fails_with(client.complete_chat("m", MESSAGES))).kind)
    assert kinds == [ErrorKind.SERVER, ErrorKind.SERVER, ErrorKind.RATE_LIMIT]
    text, _ = await client.complete_chat("m", MESSAGES)  # the queue is empty again
    assert text

    stats = (await control.get("/_sim/stats")).json()
    assert stats["queued"] == []
    assert stats["faults"]["500"] == 2 and stats["faults"]["429"] == 1
    assert stats["requests"] == 4 and stats["completed"] == 1

    bad = await control.post("/_sim/faults", json={"fault": "explode"})
    assert bad.status_code == 400


async def test_config_and_reset_endpoints(
    sim: Simulator, client: ProviderClient, control: httpx.AsyncClient
) -> None:
    r = await control.post("/_sim/config", json={"reply_tokens": 9, "fail_rate": 1})
    assert r.status_code == 200 and r.json()["reply_tokens"] == 9
    assert sim.config.reply_tokens == 9
    err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.SERVER

    assert (await control.post("/_sim/config", json={"nope": 1})).status_code == 400
    assert (await control.post("/_sim/config", json={"cut_rate": 2})).status_code == 400

    assert (await control.post("/_sim/reset")).status_code == 200
    assert sim.config.reply_tokens == 24 and sim.config.fail_rate == 0
    _, stats = await client.complete_chat("m", MESSAGES)
    assert stats.usage.output_tokens == 24
    assert sim.stats.requests == 1


async def test_models_and_health(control: httpx.AsyncClient) -> None:
    models = (await control.get("/v1/models")).json()
    assert models["object"] == "list"
    assert "sim-cheap" in {m["id"] for m in models["data"]}
    assert (await control.get("/healthz")).json() == {"status": "ok"}


async def test_simulator_speaks_openai_chunk_format(control: httpx.AsyncClient) -> None:
    body = {
        "model": "sim-cheap",
        "messages": [{"role": "user", "content": "hello [[sim:tokens=3]]"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await control.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3

    r = await control.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()


def test_reply_tokens_exact_count_polite_and_quoting() -> None:
    for question in ("Is this jacket waterproof?", "这件外套防水吗？"):
        for n in (0, 1, 3, 12, 40, 200, 1000):
            assert len(reply_tokens(question, n)) == n
    english = "".join(reply_tokens("Is this jacket waterproof?", 40))
    assert "“Is this jacket waterproof?”" in english
    assert english.endswith(("! (simulated)", ". (simulated)", "? (simulated)"))
    chinese = "".join(reply_tokens("这件外套防水吗？", 40))
    assert "“这件外套防水吗？”" in chinese and chinese.endswith("（模拟回复）")
    assert reply_tokens("a", 10, seed=1) == reply_tokens("a", 10, seed=1)


async def test_closed_client_fails_like_a_provider() -> None:
    client = ProviderClient("p", "http://127.0.0.1:9/v1", None)
    await client.aclose()
    err = await fails_with(client.complete_chat("m", MESSAGES))
    assert err.kind is ErrorKind.CONNECTION


# --- token estimates --------------------------------------------------------------------


def test_estimate_tokens_english_and_chinese() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("Hello world, how are you?") == 7  # 25 bytes / 4, rounded up
    assert estimate_tokens("我的订单在哪里") == 7  # one per hanzi
    assert estimate_tokens("订单 #1234 到了吗？") == 6 + 2  # 5 hanzi + "？", 7 other bytes
    assert estimate_tokens("こんにちは") == 5
    assert estimate_tokens("é") == 1

    messages = [ChatMessage("user", "我的订单在哪里"), ChatMessage("assistant", "a")]
    assert estimate_messages_tokens(messages) == 7 + 1 + 2 * 4


def test_trim_history_keeps_system_and_newest() -> None:
    system = ChatMessage("system", "x" * 40)  # 10 tokens + 4
    turns = [ChatMessage("user" if i % 2 else "assistant", f"{i:04d}" * 4) for i in range(10)]
    history = [system, *turns]  # each turn: 4 tokens + 4

    trimmed = trim_history(history, 14 + 3 * 8)
    assert trimmed == [system, *turns[-3:]]
    assert estimate_messages_tokens(trimmed) <= 14 + 3 * 8

    assert trim_history(history, 10_000) == history
    # Even a tiny budget keeps the system prompt and the message being answered.
    assert trim_history(history, 1) == [system, turns[-1]]
    assert trim_history([system], 1) == [system]
    assert trim_history(turns, 8 * 2) == turns[-2:]
