"""Configuration of models, providers and replies (the `providers`, `tiers`, `simulator` and
`reply` sections of swarmdesk.yaml). Lives here so orchestration needs nothing from `bot`."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIMULATOR_PROVIDER = "simulator"


class _Section(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    name: str
    input_price_per_mtok: float = Field(0.0, ge=0, description="price per 1M input tokens")
    output_price_per_mtok: float = Field(0.0, ge=0, description="price per 1M output tokens")
    max_tokens: int | None = Field(None, gt=0)


class ProviderSettings(_Section):
    name: str
    base_url: str
    api_key_env: str | None = Field(
        None, description="environment variable that holds the API key (not the key itself)"
    )
    timeout_seconds: float = Field(60.0, gt=0)
    first_token_timeout_seconds: float = Field(20.0, gt=0)
    max_concurrency: int = Field(32, ge=1)
    models: list[ModelSettings] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https:// (e.g. .../v1)")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class SimulatorSettings(_Section):
    """The built-in model simulator, used when no provider has a key."""

    first_token_ms: float = Field(300.0, ge=0)
    tokens_per_second: float = Field(50.0, gt=0)
    reply_tokens: int = Field(40, gt=0)
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0


class ReplySettings(_Section):
    system_prompt: str = (
        "You are the customer-service assistant of an online shop. Answer briefly, kindly and "
        "in the shopper's language. If you cannot help, offer to bring in a human colleague."
    )
    history_token_budget: int = Field(3000, gt=0)
    history_messages: int = Field(40, gt=0, description="how many stored messages to load")
    max_output_tokens: int = Field(800, gt=0)
    turn_deadline_seconds: float = Field(30.0, gt=0)
    fallback_text: str = (
        "Sorry, I can't answer that right now. A colleague will get back to you shortly."
    )
