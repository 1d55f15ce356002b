"""The LLM stage: asked only when unsure, JSON verdicts, failures fall back to local."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from orchestration.llm.client import ProviderClient
from orchestration.llm.registry import ModelEntry, ModelRegistry
from orchestration.llm.types import ModelPrice
from orchestration.routing import Router, RoutingSettings, parse_verdict, registry_classifier
from simulator.fakes.json_model import JsonModel
from simulator.server import Simulator

VAGUE = "lorem ipsum dolor"  # nothing the local stages know: the model is unsure
LABELS = ("logistics", "refund", "complaint", "other")


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(RoutingSettings())


@pytest.fixture
async def fake() -> AsyncIterator[JsonModel]:
    model = JsonModel()
    await model.start()
    yield model
    await model.stop()


def registry(*entries: tuple[str, str, float]) -> ModelRegistry:
    """A cheap chain of (provider name, base_url, input price) entries."""
    models = [
        ModelEntry(name, "m", ProviderClient(name, url, None), ModelPrice(price, price * 2))
        for name, url, price in entries
    ]
    return ModelRegistry(models, {"cheap": [m.ref for m in models]})


async def test_llm_stage_through_the_simulator(router: Router, simulator: Simulator) -> None:
    assert router.route_local(VAGUE).confidence < router.settings.llm_below
    models = registry(("sim", simulator.base_url or "", 1.0))
    try:
        d, records = await router.route(VAGUE, llm=registry_classifier(models))
    finally:
        await models.aclose()
    assert d.stage == "llm"
    assert d.intents == ("other",)
    assert len(records) == 1
    rec = records[0]
    assert rec.purpose == "classify" and rec.outcome == "ok" and rec.tier == "cheap"
    assert rec.input_tokens > 0 and rec.cost > 0


async def test_simulator_verdict_for_an_unclear_angry_message(simulator: Simulator) -> None:
    # Force the LLM stage for every message: the verdict's fields drive tier and escalation.
    r = Router(RoutingSettings(llm_below=1.0))
    models = registry(("sim", simulator.base_url or "", 0.0))
    try:
        d, records = await r.route(
            "I want a refund NOW, this is a scam and I'm calling my lawyer",
            llm=registry_classifier(models),
        )
    finally:
        await models.aclose()
    assert d.stage == "llm" and records[0].outcome == "ok"
    assert d.intents[0] == "refund"
    assert d.escalate and d.tier == "premium"


async def test_confident_messages_make_no_model_call(router: Router, fake: JsonModel) -> None:
    models = registry(("fake", fake.base_url, 1.0))
    try:
        d, records = await router.route("转人工", llm=registry_classifier(models))
    finally:
        await models.aclose()
    assert d.stage == "rule" and records == [] and fake.requests == []


async def test_llm_json_verdict_is_used(router: Router, fake: JsonModel) -> None:
    fake.answer = json.dumps(
        {
            "intents": ["refund", "complaint"],
            "complexity": "complex",
            "sentiment": "angry",
            "needs_human": True,
        }
    )
    models = registry(("fake", fake.base_url, 1.0))
    try:
        d, records = await router.route(VAGUE, llm=registry_classifier(models))
    finally:
        await models.aclose()
    assert d.stage == "llm" and d.intents == ("refund", "complaint")
    assert d.tier == "premium" and d.escalate and d.sentiment == "angry"
    assert d.complexity == "complex"
    body = fake.requests[0]
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][-1] == {"role": "user", "content": VAGUE}
    assert records[0].input_tokens == 100 and records[0].output_tokens == 20
    assert records[0].cost == pytest.approx((100 * 1.0 + 20 * 2.0) / 1e6)


@pytest.mark.parametrize(
    "answer",
    [
        "Sure! The shopper wants a refund.",
        '{"intents": ["teleport"], "complexity": "simple", "sentiment": "neutral", '
        '"needs_human": false}',
        '{"intents": ["refund"], "complexity": "very", "sentiment": "neutral", '
        '"needs_human": false}',
        '["refund"]',
        "",
    ],
)
async def test_invalid_llm_output_falls_back_to_local(
    router: Router, fake: JsonModel, answer: str
) -> None:
    fake.answer = answer
    local = router.route_local(VAGUE)
    models = registry(("fake", fake.base_url, 1.0))
    try:
        d, records = await router.route(VAGUE, llm=registry_classifier(models))
    finally:
        await models.aclose()
    assert d.stage == local.stage and d.intents == local.intents
    assert len(records) == 1 and records[0].outcome == "ok"  # the call was made and billed


async def test_failed_model_falls_back_to_the_next_then_to_local(
    router: Router, fake: JsonModel, simulator: Simulator
) -> None:
    fake.status = 500
    models = registry(("broken", fake.base_url, 1.0), ("sim", simulator.base_url or "", 1.0))
    try:
        d, records = await router.route(VAGUE, llm=registry_classifier(models))
    finally:
        await models.aclose()
    assert d.stage == "llm"
    assert [r.outcome for r in records] == ["server_error", "ok"]
    assert [r.provider for r in records] == ["broken", "sim"]

    only_broken = registry(("broken", fake.base_url, 1.0))
    try:
        d, records = await router.route(VAGUE, llm=registry_classifier(only_broken))
    finally:
        await only_broken.aclose()
    assert d.stage == "classifier"  # the local decision, no exception
    assert [r.outcome for r in records] == ["server_error"]


def test_parse_verdict_accepts_fenced_json_and_drops_unknown_labels() -> None:
    v = parse_verdict(
        '```json\n{"intents": ["Refund", "teleport", "refund", "other"], "complexity": '
        '"simple", "sentiment": "negative", "needs_human": false}\n```',
        LABELS,
    )
    assert v is not None and v.intents == ("refund", "other") and v.sentiment == "negative"
    assert parse_verdict('{"intents": "logistics"}', LABELS) is not None  # defaults apply
    assert parse_verdict('{"intents": ["logistics"], "needs_human": "yes"}', LABELS) is None
