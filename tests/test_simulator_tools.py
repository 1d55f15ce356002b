"""The simulator's tool calling and JSON mode, through the real ProviderClient.

A tool round trip runs for real: the simulator picks a demo-shop tool for the shopper's
text, the test calls the demo shop over HTTP with the model's arguments, sends the result
back as a `tool` message, and the simulator answers from it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from bot.demo_shop import build_demo_shop_app
from orchestration.llm.client import ProviderClient
from orchestration.llm.types import ChatMessage, ErrorKind, LLMError, ToolCall
from simulator.config import SimulatorConfig
from simulator.server import Simulator
from tests.demo_tools import call_tool, openai_tools

SYSTEM = ChatMessage("system", "You are the shop's assistant. Use the tools.")
LOGISTICS = openai_tools(["get_order", "track_parcel"])


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(
        SimulatorConfig(first_token_ms=5, tokens_per_second=400, reply_tokens=16, seed=3)
    )
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[ProviderClient]:
    async with ProviderClient("sim", sim.base_url, "key", first_token_timeout_s=5) as c:
        yield c


@pytest.fixture
async def shop() -> AsyncIterator[httpx.AsyncClient]:
    """The demo shop on a free port, mounted like the service mounts it."""
    app = web.Application()
    app.add_subapp("/demo-shop", build_demo_shop_app())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        yield http
    await runner.cleanup()


async def run(
    client: ProviderClient, messages: list[ChatMessage], **kwargs: Any
) -> tuple[list[str], Any]:
    """(text deltas, stats) of one streamed call."""
    deltas: list[str] = []
    async with client.stream_chat("sim-cheap", messages, **kwargs) as stream:
        async for delta in stream:
            deltas.append(delta)
    return deltas, stream.stats


async def tool_round(
    client: ProviderClient,
    shop: httpx.AsyncClient,
    question: str,
    tools: list[dict[str, Any]],
) -> tuple[list[ToolCall], list[str]]:
    """Ask, run the tools the model called against the shop, return (calls, answer deltas)."""
    messages = [SYSTEM, ChatMessage("user", question)]
    deltas, stats = await run(client, messages, tools=tools, tool_choice="auto")
    assert deltas == [] and stats.text == ""
    assert stats.finish_reason == "tool_calls"
    calls = list(stats.tool_calls)
    messages.append(ChatMessage("assistant", "", tool_calls=tuple(calls)))
    for call in calls:
        result = await call_tool(shop, call.name, call.arguments_json)
        messages.append(ChatMessage("tool", result, tool_call_id=call.id, name=call.name))
    answer, stats = await run(client, messages, tools=tools)
    assert stats.finish_reason == "stop" and stats.tool_calls == []
    return calls, answer


async def test_where_is_my_order_round_trip(
    client: ProviderClient, shop: httpx.AsyncClient
) -> None:
    messages = [SYSTEM, ChatMessage("user", "Hi, where is my order ORD-1001?")]
    deltas, stats = await run(client, messages, tools=LOGISTICS)
    assert deltas == []
    assert stats.finish_reason == "tool_calls"
    (call,) = stats.tool_calls
    assert call.name == "get_order" and call.id
    assert json.loads(call.arguments_json) == {"order_id": "ORD-1001"}
    assert stats.first_token_s is not None
    assert not stats.usage.estimated and stats.usage.output_tokens > 0
    assert stats.usage.input_tokens > 100  # the tool definitions are part of the prompt

    _, answer = await tool_round(client, shop, "Hi, where is my order ORD-1001?", LOGISTICS)
    order = (await shop.get("/demo-shop/api/orders/ORD-1001?shop_user_id=demo-shopper")).json()
    text = "".join(answer)
    assert len(answer) > 1  # streamed, not one blob
    assert "ORD-1001" in text and "in transit" in text
    assert order["courier"] in text and order["tracking_number"] in text


async def test_chinese_parcel_question_gets_a_chinese_answer(
    client: ProviderClient, shop: httpx.AsyncClient
) -> None:
    calls, answer = await tool_round(client, shop, "我的快递SF1746814538401到哪了？", LOGISTICS)
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("track_parcel", {"tracking_number": "SF1746814538401"})
    ]
    url = "/demo-shop/api/tracking/SF1746814538401?shop_user_id=demo-shopper"
    parcel = (await shop.get(url)).json()
    text = "".join(answer)
    assert "顺丰速运" in text and "运输中" in text
    assert parcel["latest_event"]["description_zh"] in text


async def test_two_orders_are_looked_up_in_parallel(
    client: ProviderClient, shop: httpx.AsyncClient
) -> None:
    calls, answer = await tool_round(
        client, shop, "Where are ORD-1001 and ORD-1002?", openai_tools()
    )
    assert [c.name for c in calls] == ["get_order", "get_order"]
    assert [json.loads(c.arguments_json)["order_id"] for c in calls] == ["ORD-1001", "ORD-1002"]
    assert len({c.id for c in calls}) == 2
    text = "".join(answer)
    assert "ORD-1001 is in transit" in text and "ORD-1002 was delivered" in text


@pytest.mark.parametrize(
    ("question", "tools", "name", "arguments"),
    [
        (
            "Do you have wireless earbuds in stock?",
            ["search_products", "get_product"],
            "search_products",
            {"query": "wireless earbuds"},
        ),
        ("EL-1001 有什么颜色？", ["search_products", "get_product"], "get_product",
         {"sku": "EL-1001"}),
        ("Is my coupon SAVE50 still valid?", ["check_coupon", "list_promotions"], "check_coupon",
         {"code": "SAVE50"}),
        ("双十一有什么活动？", ["check_coupon", "list_promotions"], "list_promotions", {}),
        (
            "I want a refund for ORD-1002 because the shoes are too small",
            ["get_order", "request_refund"],
            "request_refund",
            {"order_id": "ORD-1002", "reason": "the shoes are too small"},
        ),
        ("My ORD-1002 arrived, is that right?", ["get_order", "request_refund"], "get_order",
         {"order_id": "ORD-1002"}),
        ("订单号 1003 付款了吗", ["get_order", "track_parcel"], "get_order",
         {"order_id": "ORD-1003"}),  # the prefix comes from the parameter's example
    ],
)  # fmt: skip
async def test_the_tool_that_fits_the_message_is_called(
    client: ProviderClient, question: str, tools: list[str], name: str, arguments: dict[str, Any]
) -> None:
    _, stats = await run(client, [SYSTEM, ChatMessage("user", question)], tools=openai_tools(tools))
    assert [(c.name, json.loads(c.arguments_json)) for c in stats.tool_calls] == [(name, arguments)]


async def test_answers_quote_the_key_facts(client: ProviderClient, shop: httpx.AsyncClient) -> None:
    _, answer = await tool_round(
        client, shop, "Is SAVE50 still valid?", openai_tools(["check_coupon"])
    )
    assert "SAVE50 is valid" in "".join(answer) and "¥50.00 off" in "".join(answer)
    _, answer = await tool_round(client, shop, "SUMMER30还能用吗", openai_tools(["check_coupon"]))
    assert "已于" in "".join(answer) and "过期" in "".join(answer)
    _, answer = await tool_round(
        client, shop, "How much is EL-1009?", openai_tools(["get_product"])
    )
    assert "¥249.00" in "".join(answer) and "out of stock" in "".join(answer)
    _, answer = await tool_round(
        client, shop, "refund ORD-1001 please, I changed my mind", openai_tools(["request_refund"])
    )
    assert "once it is delivered" in "".join(answer)  # the shop's refusal, passed on
    _, answer = await tool_round(client, shop, "where is ORD-1999?", LOGISTICS)
    assert "couldn't find" in "".join(answer)


async def test_no_fitting_tool_means_a_text_answer(client: ProviderClient) -> None:
    deltas, stats = await run(client, [SYSTEM, ChatMessage("user", "hello!")], tools=LOGISTICS)
    assert deltas and stats.tool_calls == [] and stats.finish_reason == "stop"
    # A parcel question without any number: the model asks for one.
    deltas, stats = await run(
        client, [SYSTEM, ChatMessage("user", "where is my package?")], tools=LOGISTICS
    )
    assert stats.tool_calls == [] and "ORD-1001" in "".join(deltas)
    deltas, _ = await run(client, [SYSTEM, ChatMessage("user", "我的快递到哪了")], tools=LOGISTICS)
    assert "订单号" in "".join(deltas)


async def test_tool_choice_none_and_forced(client: ProviderClient) -> None:
    question = [SYSTEM, ChatMessage("user", "where is ORD-1001?")]
    deltas, stats = await run(client, question, tools=LOGISTICS, tool_choice="none")
    assert deltas and stats.tool_calls == []
    forced = {"type": "function", "function": {"name": "track_parcel"}}
    _, stats = await run(client, question, tools=LOGISTICS, tool_choice=forced)
    assert [c.name for c in stats.tool_calls] == ["track_parcel"]
    # parallel_tool_calls=false: one call even for two orders.
    _, stats = await run(
        client,
        [SYSTEM, ChatMessage("user", "ORD-1001 and ORD-1002?")],
        tools=LOGISTICS,
        extra={"parallel_tool_calls": False},
    )
    assert len(stats.tool_calls) == 1


async def test_tools_passed_through_extra_work_too(client: ProviderClient) -> None:
    _, stats = await run(
        client,
        [SYSTEM, ChatMessage("user", "where is ORD-1001?")],
        extra={"tools": LOGISTICS, "tool_choice": "auto"},
    )
    assert [c.name for c in stats.tool_calls] == ["get_order"]


async def test_stream_format_of_tool_calls(sim: Simulator) -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": openai_tools(),
        "messages": [{"role": "user", "content": "Where is ORD-1001 and is SAVE50 valid?"}],
    }
    chunks = []
    async with (
        httpx.AsyncClient(base_url=sim.base_url) as http,
        http.stream("POST", "/chat/completions", json=body) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] > 0
    assert parsed[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    deltas = [p["choices"][0]["delta"] for p in parsed[:-2]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        assert set(delta) <= {"role", "content", "tool_calls"}
        (entry,) = delta["tool_calls"]
        if "id" in entry:  # the first delta of a call
            assert entry["type"] == "function" and entry["function"]["arguments"] == ""
            calls[entry["index"]] = {"id": entry["id"], "name": entry["function"]["name"]}
            calls[entry["index"]]["arguments"] = ""
        else:
            assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_order", {"order_id": "ORD-1001"}),
        ("check_coupon", {"code": "SAVE50"}),
    ]
    assert len(deltas) > 4  # arguments arrive in pieces


async def test_non_streamed_tool_calls(sim: Simulator) -> None:
    body = {
        "model": "m",
        "tools": LOGISTICS,
        "messages": [{"role": "user", "content": "where is ORD-1001?"}],
    }
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        r = await http.post("/chat/completions", json=body)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert choice["message"]["content"] is None
        assert call["type"] == "function" and call["function"]["name"] == "get_order"
        result = {"id": "ORD-1001", "status": "delivered", "items": [], "courier": "ZTO Express"}
        body["messages"] += [
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
        ]
        r = await http.post("/chat/completions", json=body)
        answer = r.json()["choices"][0]
        assert answer["finish_reason"] == "stop"
        assert "ORD-1001 was delivered" in answer["message"]["content"]


async def test_faults_and_directives_still_apply_with_tools(
    sim: Simulator, client: ProviderClient
) -> None:
    question = "where is ORD-1001? [[sim:fault=cut]]"
    with pytest.raises(LLMError) as cut:
        await run(client, [SYSTEM, ChatMessage("user", question)], tools=LOGISTICS)
    assert cut.value.kind is ErrorKind.STREAM_CUT
    sim.queue_fault("500")
    with pytest.raises(LLMError) as failed:
        await run(client, [SYSTEM, ChatMessage("user", "where is ORD-1001?")], tools=LOGISTICS)
    assert failed.value.kind is ErrorKind.SERVER
    _, stats = await run(
        client, [SYSTEM, ChatMessage("user", "where is ORD-1001? [[sim:tps=0]]")], tools=LOGISTICS
    )
    assert [c.name for c in stats.tool_calls] == ["get_order"]


async def test_malformed_tool_traffic_is_a_bad_request(client: ProviderClient) -> None:
    orphan = [SYSTEM, ChatMessage("user", "hi"), ChatMessage("tool", "{}", tool_call_id="nope")]
    with pytest.raises(LLMError) as err:
        await run(client, orphan, tools=LOGISTICS)
    assert err.value.kind is ErrorKind.BAD_REQUEST and "tool_call_id" in err.value.detail
    with pytest.raises(LLMError) as err:
        await run(client, [ChatMessage("user", "hi")], tools=[{"type": "function"}])
    assert err.value.kind is ErrorKind.BAD_REQUEST and "tools[0]" in err.value.detail


def test_chat_message_serialization() -> None:
    assert ChatMessage("user", "hi").to_openai() == {"role": "user", "content": "hi"}
    call = ToolCall("call_1", "get_order", '{"order_id":"ORD-1001"}')
    assert ChatMessage("assistant", "", tool_calls=(call,)).to_openai() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_order", "arguments": '{"order_id":"ORD-1001"}'},
            }
        ],
    }
    assert ChatMessage("tool", "{}", tool_call_id="call_1", name="get_order").to_openai() == {
        "role": "tool",
        "content": "{}",
        "tool_call_id": "call_1",
        "name": "get_order",
    }


# --- JSON classification mode --------------------------------------------------------------

JSON_MODE = {"response_format": {"type": "json_object"}}


async def classify(client: ProviderClient, text: str) -> dict[str, Any]:
    reply, stats = await client.complete_chat(
        "sim-cheap",
        [ChatMessage("system", "Classify the message. Answer in JSON."), ChatMessage("user", text)],
        extra=JSON_MODE,
    )
    assert stats.finish_reason == "stop"
    verdict: dict[str, Any] = json.loads(reply)
    return verdict


async def test_json_mode_classifies_the_last_user_message(client: ProviderClient) -> None:
    verdict = await classify(client, "where is my parcel SF1746814538401?")
    assert verdict == {
        "intents": ["logistics"],
        "complexity": "simple",
        "sentiment": "neutral",
        "needs_human": False,
    }
    verdict = await classify(client, "我要退款，耳机坏了")
    assert verdict["intents"] == ["refund"] and verdict["sentiment"] == "negative"
    verdict = await classify(client, "Is SAVE50 valid and do you have the jacket in size L?")
    assert verdict["intents"] == ["discount", "product"] and verdict["complexity"] == "complex"
    verdict = await classify(client, "THIS IS RIDICULOUS, get me a human NOW!!!")
    assert verdict["intents"][0] == "human" and verdict["sentiment"] == "angry"
    assert verdict["needs_human"] is True
    assert (await classify(client, "你好"))["intents"] == ["greeting"]
    assert (await classify(client, "asdfgh"))["intents"] == ["other"]


async def test_json_mode_is_deterministic(client: ProviderClient) -> None:
    text = "ORD-1002 的鞋子尺码不对，能换货吗？还有优惠券可以叠加吗"
    first = await classify(client, text)
    assert first == await classify(client, text)
    assert set(first) == {"intents", "complexity", "sentiment", "needs_human"}
    assert first["intents"][0] == "refund" and "discount" in first["intents"]
    assert first["complexity"] == "complex"
