"""The models the service talks to: the configured providers, or the built-in simulator
started in this process when no provider is usable — the embedded demo, or a deployment that
allows it by name (bot/safety.py decides; the service and `swarmdesk route --llm`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import structlog

from bot import safety
from bot.settings import ConfigError, Settings
from orchestration.llm.registry import ModelRegistry
from simulator.config import SimulatorConfig
from simulator.server import Simulator

log = structlog.get_logger(__name__)


@asynccontextmanager
async def open_models(
    settings: Settings, simulator: SimulatorConfig | None = None
) -> AsyncIterator[ModelRegistry]:
    """The registry of the configured tiers; `simulator` overrides the built-in simulator's
    pace from `settings.simulator`."""
    sim: Simulator | None = None
    if settings.uses_simulator():
        s = settings.simulator
        sim = Simulator(
            simulator
            or SimulatorConfig(
                first_token_ms=s.first_token_ms,
                tokens_per_second=s.tokens_per_second,
                reply_tokens=s.reply_tokens,
            )
        )
        base_url = await sim.start()
        models = ModelRegistry.for_simulator(base_url, s)
        log.warning(
            "model_simulator",
            detail="no provider configured: the built-in model simulator answers (the demo); "
            "name a provider with its api_key_env to use a real model",
            url=base_url,
        )
    else:
        dead = safety.unusable_tier_models(settings)
        if dead:
            raise ConfigError(
                "tiers name models whose provider has no key: "
                + "; ".join(f"{t}: {', '.join(refs)}" for t, refs in dead.items())
            )
        models = ModelRegistry.from_settings(settings.live_providers(), settings.tiers)
        log.info("models", tiers={t: [e.ref for e in models.chain(t)] for t in models.tiers})
    try:
        yield models
    finally:
        await models.aclose()
        if sim is not None:
            await sim.stop()


def fast_models(settings: Settings) -> AbstractAsyncContextManager[ModelRegistry]:
    """For command-line tools: a simulator that answers at once."""
    return open_models(settings, SimulatorConfig(first_token_ms=5, tokens_per_second=2000))
