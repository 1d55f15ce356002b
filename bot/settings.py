"""swarmdesk configuration: one YAML file, overridden by SWARMDESK_* environment variables.

Secrets never live in the YAML file: a provider names the environment variable holding its key.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from channels.api.config import ApiSettings
from channels.telegram.config import TelegramSettings
from channels.wechat.config import WechatSettings
from channels.wechat.kf_config import WecomKfSettings
from channels.widget.config import WidgetSettings
from config_section import ConfigSection
from knowledge.config import KnowledgeSettings
from orchestration.config import (
    SIMULATOR_PROVIDER,
    BudgetSettings,
    ProviderSettings,
    ReplySettings,
    ResilienceSettings,
    SimulatorSettings,
    SpecialistSettings,
    ToolSettings,
)
from orchestration.routing.config import RoutingSettings
from orchestration.shop_knowledge import SEARCH_KNOWLEDGE

DEFAULT_CONFIG_FILE = "swarmdesk.yaml"
CONFIG_ENV = "SWARMDESK_CONFIG"


class ServerSettings(ConfigSection):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(64 * 1024, gt=0, description="largest accepted request body")
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    public_url: str | None = Field(None, description="URL the platforms reach us at")


class DatabaseSettings(ConfigSection):
    url: str = "sqlite+aiosqlite:///./swarmdesk.db"
    migrate_on_start: bool = True
    pool_size: int = Field(10, ge=1)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _async_driver(cls, v: str) -> str:
        if v.startswith(("sqlite:", "postgresql:", "postgres:")) or v.startswith(
            "postgresql+psycopg"
        ):
            raise ValueError(
                "use an async driver: 'sqlite+aiosqlite:///path.db' or "
                "'postgresql+asyncpg://user@host/db'"
            )
        if not v.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:")):
            raise ValueError(
                "unsupported database; use 'sqlite+aiosqlite:///path.db' or "
                "'postgresql+asyncpg://user@host/db'"
            )
        return v


class ChannelsSettings(ConfigSection):
    api: ApiSettings = Field(default_factory=ApiSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    wechat: WechatSettings = Field(default_factory=WechatSettings)
    wecom_kf: WecomKfSettings = Field(default_factory=WecomKfSettings)
    widget: WidgetSettings = Field(default_factory=WidgetSettings)


class LogSettings(ConfigSection):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class WorkerSettings(ConfigSection):
    max_concurrent_conversations: int = Field(256, ge=1)


QueueBackend = Literal["memory", "redis"]


class QueueSettings(ConfigSection):
    """Where the work, the live events and the shared state of the processes live.

    `memory` (the default): one process, everything in it. `redis`: any number of processes
    (on one machine with `serve --workers N`, or several behind a load balancer) on one
    PostgreSQL database share the work through Redis (bot/distributed/)."""

    backend: QueueBackend = "memory"
    url: str = Field("redis://127.0.0.1:6379/0", description="the Redis server (backend redis)")
    key_prefix: str = Field(
        "swarmdesk",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="every Redis key starts with it: one Redis can serve several shops",
    )
    partitions: int = Field(
        32,
        ge=1,
        le=4096,
        description="conversations are spread over this many work streams; each is worked by "
        "one process at a time (more than the processes you will ever run)",
    )
    lease_seconds: float = Field(
        10.0,
        ge=1.0,
        le=300.0,
        description="a process that stops renewing its streams (killed, hung) loses them "
        "after this long and another process takes their work over",
    )
    sweep_seconds: float = Field(
        15.0,
        gt=0,
        description="how often a process looks in the database for stored messages the "
        "queue lost (a crash between storing and queueing, a Redis restart)",
    )


class RedisUrl(ConfigSection):
    url: str | None = Field(
        None, description="another Redis server for this part; default: queue.url"
    )


class DemoShopSettings(ConfigSection):
    enabled: bool = Field(
        True, description="serve the sample shop backend (orders, tracking, ...) under /demo-shop"
    )


WebhookEvent = Literal[
    "handoff.requested",
    "conversation.claimed",
    "conversation.assigned",
    "conversation.unassigned",
    "conversation.resolved",
    "conversation.handed_back",
]


DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "handoff.requested",
    "conversation.claimed",
    "conversation.resolved",
)


class WebhookSettings(ConfigSection):
    """A shop's endpoint told of handoffs and of what its people do (to page them...)."""

    url: str = Field(description="https://... that receives POSTed JSON events")
    secret_env: str = Field(description="environment variable holding the HMAC signing secret")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))
    max_attempts: int = Field(6, ge=1, le=20)
    retry_initial_seconds: float = Field(2.0, gt=0, description="then doubling, up to 5 min")


class CannedReply(ConfigSection):
    """A saved answer agents insert by its shortcut; {name} and {order_id} are filled in."""

    shortcut: str = Field(pattern=r"^[\w-]{1,32}$", description="what an agent types after /")
    text: str
    language: str = Field("any", description="en, zh, ... or any")


class ConsoleSettings(ConfigSection):
    waiting_alert_seconds: float = Field(
        300.0, gt=0, description="a conversation waiting longer for a person is flagged"
    )
    max_reply_chars: int = Field(4000, gt=0, description="longest reply or note of an agent")
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    canned_replies: list[CannedReply] = Field(
        default_factory=lambda: [
            CannedReply(
                shortcut="hello",
                language="en",
                text="Hi {name}, this is the support team. I'm looking into it now.",
            ),
            CannedReply(
                shortcut="hello", language="zh", text="{name}您好，我是人工客服，正在为您处理。"
            ),
            CannedReply(
                shortcut="order",
                language="en",
                text="I've checked order {order_id}; here is what I found: ",
            ),
            CannedReply(shortcut="order", language="zh", text="已为您查询订单 {order_id}："),
        ]
    )
    satisfaction_channels: list[str] = Field(
        default_factory=lambda: ["widget"],
        description="channels whose shoppers are asked to rate (1-5) a resolved conversation",
    )
    satisfaction_question: str = (
        "This conversation is closed. How satisfied are you with our help? Reply 1 (poor) to 5 "
        "(excellent)."
    )
    satisfaction_question_zh: str = (
        "本次会话已结束。请问您对我们的服务满意吗？回复 1（很差）到 5（很好）。"
    )


DemoPart = Literal["simulator", "demo_shop", "demo_tools", "demo_site", "builtin_faq"]


class DemoSettings(ConfigSection):
    """The demo runs on the embedded defaults (loopback, no providers). A deployment that is
    not on loopback or names a provider refuses to start with demo parts still on, unless
    they are named here (bot/safety.py says why each one matters)."""

    allow: list[DemoPart] = Field(
        default_factory=list,
        description="demo parts a real deployment keeps on purpose: simulator, demo_shop, "
        "demo_tools, demo_site, builtin_faq",
    )


class MetricsSettings(ConfigSection):
    token_env: str | None = Field(
        None,
        description="environment variable with a bearer token /metrics then requires "
        "(unset: /metrics is open, fine on loopback only)",
    )


class Settings(BaseSettings):
    """Everything swarmdesk reads at start. Load with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SWARMDESK_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    providers: list[ProviderSettings] = Field(default_factory=list)
    tiers: dict[str, list[str]] = Field(
        default_factory=dict,
        description="tier name -> chain of 'provider/model', tried in order",
    )
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)
    reply: ReplySettings = Field(default_factory=ReplySettings)
    channels: ChannelsSettings = Field(default_factory=ChannelsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    bus: RedisUrl = Field(
        default_factory=RedisUrl, description="live events between processes (backend redis)"
    )
    state: RedisUrl = Field(
        default_factory=RedisUrl,
        description="tokens, rate limits, breakers, budgets shared by the processes",
    )
    log: LogSettings = Field(default_factory=LogSettings)
    specialists: list[SpecialistSettings] = Field(
        default_factory=lambda: _packaged("orchestration", "default_specialists.yaml"),
        description="who answers which intents; default: the demo shop's team",
    )
    tools: list[ToolSettings] = Field(
        default_factory=lambda: _packaged("bot.demo_shop", "tools.yaml"),
        description="HTTP tools of the shop's backend; default: the demo shop's",
    )
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    demo_shop: DemoShopSettings = Field(default_factory=DemoShopSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; environment variables win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [p.name for p in self.providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"providers: duplicate provider name(s) {dupes}; names must be unique")
        if SIMULATOR_PROVIDER in names:
            raise ValueError(f"providers: the name '{SIMULATOR_PROVIDER}' is reserved")
        tool_names = {t.name for t in self.tools}
        if SEARCH_KNOWLEDGE in tool_names:
            raise ValueError(
                f"tools: '{SEARCH_KNOWLEDGE}' is built in (the shop's documents); give the "
                "HTTP tool another name"
            )
        for i, sp in enumerate(self.specialists):
            for tool in sp.tools:
                if tool not in tool_names and tool != SEARCH_KNOWLEDGE:
                    raise ValueError(
                        f"specialists[{i}] ({sp.name}): tool '{tool}' is not defined in "
                        f"'tools' (defined: {', '.join(sorted(tool_names)) or 'none'})"
                    )
            # cheap/premium are the tiers routing speaks of; a missing one falls back to the
            # first configured chain. Any other name must be configured (catches typos).
            if sp.tier is not None and sp.tier not in {"cheap", "premium", *self.tiers}:
                raise ValueError(
                    f"specialists[{i}] ({sp.name}): tier '{sp.tier}' is not in 'tiers' "
                    f"({', '.join(self.tiers)})"
                )
        spec_names = [sp.name for sp in self.specialists]
        if len(set(spec_names)) != len(spec_names):
            raise ValueError("specialists: names must be unique")
        embeddings = self.knowledge.embeddings
        if embeddings is not None and embeddings.provider not in names:
            raise ValueError(
                f"knowledge.embeddings.provider: '{embeddings.provider}' is not in 'providers' "
                f"(configured: {', '.join(names) or 'none'}); name one or remove the setting"
            )
        known = {f"{p.name}/{m.name}" for p in self.providers for m in p.models}
        for tier, chain in self.tiers.items():
            if not chain:
                raise ValueError(f"tiers.{tier}: the chain is empty; list at least one model")
            for i, ref in enumerate(chain):
                if ref not in known:
                    hint = ", ".join(sorted(known)) or "none: add a provider first"
                    raise ValueError(
                        f"tiers.{tier}[{i}]: '{ref}' is not a configured 'provider/model' "
                        f"(known: {hint})"
                    )
        telegram = self.channels.telegram
        if self.distributed and telegram.enabled and telegram.mode == "polling":
            raise ValueError(
                "channels.telegram.mode: polling is for one development process; with "
                "queue.backend: redis every process would poll and Telegram refuses all but "
                "one: use mode: webhook"
            )
        if self.queue.backend == "redis" and self.database.url.startswith("sqlite"):
            raise ValueError(
                "queue.backend: redis shares the work between processes, which cannot share a "
                "SQLite file; set database.url to PostgreSQL "
                "('postgresql+asyncpg://user@host/db') or use queue.backend: memory"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Several processes share the work (queue.backend: redis)."""
        return self.queue.backend == "redis"

    def redis_url(self, part: Literal["queue", "bus", "state"]) -> str:
        """The Redis server of one part of the distributed mode."""
        if part == "bus" and self.bus.url:
            return self.bus.url
        if part == "state" and self.state.url:
            return self.state.url
        return self.queue.url

    def live_providers(self) -> list[ProviderSettings]:
        """Providers whose key is present (or that need none, like a local vLLM)."""
        return [p for p in self.providers if p.api_key_env is None or p.api_key()]

    def uses_simulator(self) -> bool:
        return not self.live_providers()


def _packaged(package: str, name: str) -> list[Any]:
    """A list shipped as YAML inside a package (the built-in defaults)."""
    try:
        text = resources.files(package).joinpath(name).read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return []
    data = yaml.safe_load(text)
    return list(data or [])


class ConfigError(Exception):
    """A configuration file that can't be used; the message says what to fix."""


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The YAML file to read: --config, else $SWARMDESK_CONFIG, else ./swarmdesk.yaml if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(
            f"{path}: file not found (run 'swarmdesk config example > {path}' to start one)"
        ) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (server:, ...)")
    return data


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply environment overrides and validate.

    Raises pydantic.ValidationError or ConfigError; `bot.config_check` turns both into advice.
    """
    p = config_path(path)
    data = read_yaml(p) if p else {}
    data.update(overrides)
    return Settings(**data)
