"""Configuration of models, providers and replies (the `providers`, `tiers`, `simulator` and
`reply` sections of swarmdesk.yaml). Lives here so orchestration needs nothing from `bot`."""

from __future__ import annotations

import os
import re
from datetime import datetime, time
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection

SIMULATOR_PROVIDER = "simulator"
# The placeholder filled with the verified shopper's id in the shop (never by the model).
SHOP_USER_ID = "shop_user_id"
PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


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
    continuation: Literal["instruction", "prefix", "partial"] = Field(
        "instruction",
        description="how an answer cut mid-stream is continued: 'instruction' (any model: "
        "its text so far plus 'continue'), or the provider's prefix mode: 'prefix' "
        "(DeepSeek, base_url .../beta) or 'partial' (Kimi/Moonshot)",
    )

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


class BusinessHours(ConfigSection):
    """When people answer handed-over conversations; outside, the shopper gets the away text."""

    timezone: str = Field("Asia/Shanghai", description="an IANA zone, e.g. Europe/Berlin")
    days: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 7], description="ISO weekdays, 1 = Monday"
    )
    opens: time = time(9, 0)
    closes: time = time(21, 0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(
                f"unknown time zone '{value}': use an IANA name such as Asia/Shanghai"
            ) from e
        return value

    def open_at(self, when: datetime) -> bool:
        local = when.astimezone(ZoneInfo(self.timezone))
        return local.isoweekday() in self.days and self.opens <= local.time() < self.closes


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
    # When a person is asked for outside business_hours (null: people are always there).
    business_hours: BusinessHours | None = None
    away_notice: str = (
        "Our team is offline right now. A colleague will reply here as soon as we are back."
    )
    away_notice_zh: str | None = "人工客服目前不在线，上班后会第一时间在这里回复您。"
    no_knowledge_text: str = Field(
        "I'd rather not guess on that one: let me check it with the team. If you'd like a "
        'person to help you now, just reply "human".',
        description="the answer to a question about the shop's rules or policies that none of "
        "the shop's documents answers (the bot never invents a policy)",
    )
    no_knowledge_text_zh: str | None = (
        "这个问题我需要先核实一下，不想给您不准确的答复。如需人工客服帮您处理，请回复“转人工”。"
    )
    aggregation_attempt_seconds: float = Field(
        8.0, gt=0, description="a composing model slower than this gives way to the next"
    )
    aggregation_reserve_seconds: float = Field(
        4.0, ge=0, description="time kept for composing one answer from several specialists"
    )
    conflicting_specialists: list[list[str]] = Field(
        default_factory=lambda: [["discount", "refund"]],
        description="groups of specialists whose answers may contradict each other (prices: "
        "a discount vs a refund); when two of a group answer one message, the one of "
        "highest priority answers first and, only where both state money figures, a model "
        "writes the other's part to agree with it. Any other answers are joined as they are, "
        "as they finish",
    )
    speculate: bool = Field(
        True,
        description="while the paid classification of a message the local router is unsure "
        "of runs, start the specialists of the router's own guess, their text held; kept "
        "where the classification agrees, cancelled (and recorded as `speculative` calls) "
        "where it does not",
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
    anonymous_per_day: float | None = Field(
        20.0,
        gt=0,
        description="today's limit for conversations of shoppers nobody vouched for (anonymous "
        "widget visitors, chats without a shop user id): a flood of them cannot spend more; "
        "null: no limit",
    )
    degrade_at: float = Field(
        0.8, gt=0, le=1, description="share of a budget after which only the cheap tier is used"
    )
    speculate_below: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of a budget after which no specialist starts on a routing guess "
        "(reply.speculate): a wrong guess is paid for twice",
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
        " {placeholders} are filled from the arguments, {shop_user_id} from the verified shopper"
    )
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments the model sets; calls are validated against it",
    )
    bound_arguments: dict[str, str] = Field(
        default_factory=dict,
        description="arguments swarmdesk adds itself, never the model: "
        "'{shop_user_id}' is the verified shopper's id in the shop",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    auth_env: str | None = Field(None, description="env var with a bearer token for the backend")
    timeout_seconds: float = Field(5.0, gt=0)
    requires_verified_user: bool = Field(
        True,
        description="only for shoppers whose identity the shop vouched for (the default: tools "
        "touch a shopper's data); false for public data such as products and coupons",
    )

    @model_validator(mode="after")
    def _check_arguments(self) -> ToolSettings:
        try:
            validator_for(self.parameters).check_schema(self.parameters)
        except SchemaError as e:
            raise ValueError(
                f"tool '{self.name}': parameters is not a JSON schema: {e.message}"
            ) from None
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool '{self.name}': parameters must be of type 'object'")
        props = self.parameters.get("properties") or {}
        required = set(self.parameters.get("required") or [])
        if SHOP_USER_ID in props:
            raise ValueError(
                f"tool '{self.name}': the model must not set '{SHOP_USER_ID}'; remove it from "
                f"parameters and write {{{SHOP_USER_ID}}} in url or bound_arguments instead"
            )
        for name in self.bound_arguments:
            if name in props:
                raise ValueError(
                    f"tool '{self.name}': '{name}' is both a parameter and a bound argument"
                )
        for name, value in self.bound_arguments.items():
            unknown = set(PLACEHOLDER.findall(value)) - {SHOP_USER_ID}
            if unknown:
                raise ValueError(
                    f"tool '{self.name}': bound_arguments.{name} may use only "
                    f"{{{SHOP_USER_ID}}} (found {', '.join(sorted(unknown))})"
                )
        for name in PLACEHOLDER.findall(self.url):
            if name != SHOP_USER_ID and name not in required:
                raise ValueError(
                    f"tool '{self.name}': url placeholder {{{name}}} must be a required "
                    "parameter (list it in parameters.properties and parameters.required)"
                )
        if self.uses_identity() and not self.requires_verified_user:
            raise ValueError(
                f"tool '{self.name}': it sends {{{SHOP_USER_ID}}}, so it needs "
                "requires_verified_user: true"
            )
        return self

    def uses_identity(self) -> bool:
        """Whether the verified shopper's id goes to the backend."""
        marker = f"{{{SHOP_USER_ID}}}"
        texts = [self.url, *self.bound_arguments.values(), *self.headers.values()]
        return any(marker in t for t in texts)


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
