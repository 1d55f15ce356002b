"""Provider clients and tier chains, built from configuration."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from orchestration.config import SIMULATOR_PROVIDER, ProviderSettings, SimulatorSettings
from orchestration.llm.client import ProviderClient
from orchestration.llm.types import ModelPrice

SIM_CHEAP = "sim-cheap"
SIM_PREMIUM = "sim-premium"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    provider: str
    model: str
    client: ProviderClient
    price: ModelPrice
    max_tokens: int | None = None
    rpm: int | None = None  # provider limits, enforced by orchestration.resilience
    tpm: int | None = None
    # How a cut answer is continued: "instruction" (any model), or the provider's own
    # prefix mode, "prefix" (DeepSeek) / "partial" (Kimi).
    continuation: str = "instruction"

    @property
    def ref(self) -> str:
        return f"{self.provider}/{self.model}"


class ModelRegistry:
    def __init__(self, entries: Iterable[ModelEntry], tiers: dict[str, list[str]]) -> None:
        self._entries = {e.ref: e for e in entries}
        self._tiers = {name: [self._entries[r] for r in refs] for name, refs in tiers.items()}
        self._clients = {id(e.client): e.client for e in self._entries.values()}

    @classmethod
    def from_settings(
        cls, providers: Iterable[ProviderSettings], tiers: dict[str, list[str]]
    ) -> ModelRegistry:
        entries: list[ModelEntry] = []
        for p in providers:
            client = ProviderClient(
                p.name,
                p.base_url,
                p.api_key(),
                timeout_s=p.timeout_seconds,
                first_token_timeout_s=p.first_token_timeout_seconds,
                max_concurrency=p.max_concurrency,
            )
            for m in p.models:
                price = ModelPrice(m.input_price_per_mtok, m.output_price_per_mtok)
                entries.append(
                    ModelEntry(
                        p.name,
                        m.name,
                        client,
                        price,
                        m.max_tokens,
                        m.rpm,
                        m.tpm,
                        p.continuation,
                    )
                )
        return cls(entries, tiers)

    @classmethod
    def for_simulator(cls, base_url: str, sim: SimulatorSettings) -> ModelRegistry:
        """Both tiers on the built-in simulator (no LLM key configured)."""
        client = ProviderClient(SIMULATOR_PROVIDER, base_url, None, max_concurrency=1024)
        price = ModelPrice(sim.price_input_per_mtok, sim.price_output_per_mtok)
        entries = [
            ModelEntry(SIMULATOR_PROVIDER, SIM_CHEAP, client, price),
            ModelEntry(SIMULATOR_PROVIDER, SIM_PREMIUM, client, price),
        ]
        return cls(
            entries,
            {
                "cheap": [f"{SIMULATOR_PROVIDER}/{SIM_CHEAP}"],
                "premium": [f"{SIMULATOR_PROVIDER}/{SIM_PREMIUM}"],
            },
        )

    def chain(self, tier: str) -> list[ModelEntry]:
        if tier in self._tiers:
            return self._tiers[tier]
        # An unknown tier falls back to the first configured one rather than failing a reply.
        return next(iter(self._tiers.values()), [])

    @property
    def tiers(self) -> list[str]:
        return list(self._tiers)

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
