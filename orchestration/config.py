"""Configuration of models, providers and replies (the `providers`, `tiers`, `simulator` and
`reply` sections of swarmdesk.yaml). Lives here so orchestration needs nothing from `bot`."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator

from config_section import ConfigSection

SIMULATOR_PROVIDER = "simulator"


class ModelSettings(ConfigSection):
    name: str
    input_price_per_mtok: float = Field(0.0, ge=0, description="price per 1M input tokens")
    output_price_per_mtok: float = Field(0.0, ge=0, description="price per 1M output tokens")
    max_tokens: int | None = Field(None, gt=0)
    rpm: int | None = Field(None, gt=0, description="requests per minute allowed by the provider")
    tpm: int | None = Field(None, gt=0, description="tokens per minute allowed by the provider")


class ProviderSettings(ConfigSection):
    name: str
    base_url: str
    api_key_env: str | None = Field(
        None, description="environment variable that holds the API key (not the key itself)"
    )
    timeout_seconds: float = Field(60.0, gt=0)
    first_token_timeout_seconds: float = Field(20.0, gt=0)
    max_concurrency: int = Field(
        256, ge=1, description="open connections (= calls in flight) to this provider"
    )
    models: list[ModelSettings] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https:// (e.g. .../v1)")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class SimulatorSettings(ConfigSection):
    """The built-in model simulator, used when no provider has a key."""

    first_token_ms: float = Field(300.0, ge=0)
    tokens_per_second: float = Field(50.0, gt=0)
    reply_tokens: int = Field(40, gt=0)
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0


class ReplySettings(ConfigSection):
    system_prompt: str = (
        "You are the customer-service assistant of an online shop. Answer briefly, kindly and "
        "in the shopper's language. If you cannot help, offer to bring in a human colleague."
    )
    history_token_budget: int = Field(3000, gt=0)
    history_messages: int = Field(40, gt=0, description="how many stored messages to load")
    max_output_tokens: int = Field(800, gt=0)
    turn_deadline_seconds: float = Field(30.0, gt=0)
    stream_flush_ms: int = Field(
        100,
        ge=0,
        le=1000,
        description="tokens arriving within this time of the last handed-on delta go on "
        "together (0: as they arrive); the first token always goes at once",
    )
    fallback_text: str = (
        "Sorry, I can't answer that right now. A colleague will get back to you shortly."
    )
    fallback_text_zh: str | None = "抱歉，我暂时无法回答这个问题，同事会尽快回复您。"
    handoff_notice: str = "A colleague will join this conversation shortly."
    handoff_notice_zh: str | None = "人工客服稍后会加入对话。"
    aggregation_attempt_seconds: float = Field(
        8.0, gt=0, description="a composing model slower than this gives way to the next"
    )
    aggregation_reserve_seconds: float = Field(
        4.0, ge=0, description="time kept for composing one answer from several specialists"
    )


class ResilienceSettings(ConfigSection):
    """How a failing or slow model is handled (DESIGN.md, Orchestration)."""

    retries: int = Field(1, ge=0, le=5, description="retries of one model before the next")
    backoff_initial_seconds: float = Field(0.2, ge=0)
    backoff_max_seconds: float = Field(2.0, ge=0)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open it")
    breaker_error_rate: float = Field(0.5, gt=0, le=1, description="error share that opens it")
    breaker_window: int = Field(20, ge=2, description="calls the error share is taken over")
    breaker_cooldown_seconds: float = Field(30.0, gt=0, description="open time before a probe")
    hedge_after_seconds: float | None = Field(
        2.5, gt=0, description="no first token by then: start the next model too (null: never)"
    )
    chain_walks: int = Field(
        3, ge=1, le=10, description="times a failing chain is walked while the turn has time"
    )
    min_attempt_seconds: float = Field(
        1.0, ge=0, description="no new walk of the chain with less time than this left"
    )
    limiter_wait_seconds: float = Field(
        1.0, ge=0, description="longest wait for a rate-limit slot before trying the next model"
    )


class BudgetSettings(ConfigSection):
    """Money limits, in the currency of the price table. null: no limit."""

    per_conversation: float | None = Field(None, gt=0)
    per_day: float | None = Field(None, gt=0)
    degrade_at: float = Field(
        0.8, gt=0, le=1, description="share of a budget after which only the cheap tier is used"
    )
    exhausted_text: str = (
        "Thanks for your patience! A colleague will take over this conversation shortly."
    )
    exhausted_text_zh: str | None = "感谢您的耐心等待！人工客服将很快接手为您服务。"


class ToolSettings(ConfigSection):
    """An OpenAI function tool backed by an HTTP endpoint of the shop's backend."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str
    method: str = Field("GET", pattern=r"^(GET|POST|PUT|PATCH|DELETE)$")
    url: str = Field(
        description="absolute, or relative to this service (e.g. /demo-shop/api/orders/{order_id});"
        " {placeholders} are filled from the arguments"
    )
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    headers: dict[str, str] = Field(default_factory=dict)
    auth_env: str | None = Field(None, description="env var with a bearer token for the backend")
    timeout_seconds: float = Field(5.0, gt=0)
    requires_verified_user: bool = Field(
        False, description="only for shoppers whose identity the shop vouched for"
    )


class SpecialistSettings(ConfigSection):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    intents: list[str] = Field(min_length=1)
    system_prompt: str
    tier: str | None = Field(None, description="null: the tier routing chose for the message")
    tools: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(8.0, gt=0)
    priority: int = Field(0, description="higher wins when specialists disagree")
    degraded_text: str = Field(
        "I couldn't check that just now; a colleague will confirm it shortly.",
        description="said in this specialist's place when it fails or runs out of time",
    )
    degraded_text_zh: str | None = Field(None, description="the same, for Chinese messages")
    escalates: bool = Field(False, description="hands the conversation to a person")
    max_tool_rounds: int = Field(3, ge=0, le=8)
