"""The aiohttp application: one server for webhooks, APIs, health and metrics."""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot import demo_shop, metrics, safety
from bot.console.api import AgentApi
from bot.console.assets import register_console_assets
from bot.console.auth import SharedSignInLimits
from bot.console.webhooks import Webhooks, missing_secrets
from bot.demo_shop import build_demo_shop_app
from bot.distributed.bus import RedisHub, mirror_taken
from bot.distributed.locks import RedisLocks
from bot.distributed.queue import RedisQueue
from bot.hub import Hub
from bot.locks import LockStore
from bot.models import open_models
from bot.pipeline import Pipeline
from bot.pipeline.host import Host
from bot.settings import ConfigError, Settings
from bot.workqueue import InProcessQueue, WorkQueue
from channels import api, telegram, wechat, widget
from channels.base import Channel
from channels.http import ApiError, error_response, json_errors
from cluster.redis import RedisParts
from knowledge.base import DEFAULT_COLLECTION
from knowledge.service import KnowledgeBase
from orchestration.budgets import SharedBudgets
from orchestration.llm.registry import ModelRegistry
from orchestration.orchestrator import Orchestrator
from orchestration.resilience import Guards
from orchestration.routing import Router, registry_classifier
from orchestration.runner import ModelRunner
from orchestration.summary import registry_summariser
from orchestration.tools import ToolRunner
from storage import db, executor
from storage.ledger import spent_since

log = structlog.get_logger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    pipeline: Pipeline
    # The ORM on the async engine: for the demo shop's tools and for tests that look inside.
    sessions: async_sessionmaker[AsyncSession]
    orchestrator: Orchestrator
    models: ModelRegistry
    channels: dict[str, Channel]
    tools: ToolRunner
    knowledge: KnowledgeBase  # the shop's documents

    @property
    def host(self) -> Host:
        return self.pipeline.host

    def listening_on(self, base_url: str) -> None:
        """The service's own address, once bound: relative tool URLs (the demo shop) use it."""
        self.tools.base_url = base_url


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def build_orchestrator(
    settings: Settings,
    models: ModelRegistry,
    tools: ToolRunner,
    knowledge: KnowledgeBase,
    cluster: RedisParts | None = None,
) -> Orchestrator:
    """The team that answers shoppers, as configured (the service and `eval-knowledge`).
    With `cluster`, breakers, limits, cool-downs and budgets are shared by the processes."""
    orchestrator = Orchestrator(
        ModelRunner(
            models,
            Guards(settings.resilience, shared=cluster),
            settings.resilience,
            flush_seconds=settings.reply.stream_flush_ms / 1000,
        ),
        Router(settings.routing),
        settings.specialists,
        tools,
        settings.reply,
        settings.budgets,
        classifier=registry_classifier(models),
        knowledge=knowledge,
    )
    if cluster is not None:
        orchestrator.budgets = SharedBudgets(settings.budgets, cluster)
    return orchestrator


# The demo shop's policies and product pages (watched while the demo shop is on).
DEMO_KNOWLEDGE = Path(demo_shop.__file__).parent / "knowledge"
SETTINGS = web.AppKey("settings", Settings)
CHANNELS: web.AppKey[dict[str, Channel]] = web.AppKey("channels", dict)


def _own_url(settings: Settings) -> str | None:
    """This service's address as seen from itself (known now unless the port is 0)."""
    port = settings.server.port
    if not port:
        return None
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def build_channels(settings: Settings) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    for ch in (
        *api.build(settings.channels.api, server_host=settings.server.host),
        *telegram.build(settings.channels.telegram),
        *wechat.build(settings.channels.wechat),
        *wechat.build_kf(settings.channels.wecom_kf),
        *widget.build(settings.channels.widget),
    ):
        channels[ch.name] = ch
    return channels


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = db.create_engine(
        settings.database.url, pool_size=settings.database.pool_size, echo=settings.database.echo
    )
    if settings.database.migrate_on_start:
        await db.upgrade(engine)
    # The distributed mode's Redis connections (queue.backend: redis); None when embedded.
    cluster = (
        RedisParts.connect(
            settings.redis_url("queue"),
            settings.redis_url("bus"),
            settings.redis_url("state"),
            settings.queue.key_prefix,
        )
        if settings.distributed
        else None
    )
    model_scope = AsyncExitStack()
    models = await model_scope.enter_async_context(open_models(settings))
    channels: dict[str, Channel] = app[CHANNELS]
    tools = ToolRunner(settings.tools, base_url=_own_url(settings))
    database = executor.for_engine(engine, settings.database.pool_size)
    knowledge = await KnowledgeBase.open(database, settings.knowledge, providers=settings.providers)
    if settings.demo_shop.enabled:
        knowledge.add_folder(DEMO_KNOWLEDGE, collection=DEFAULT_COLLECTION)
    # Watched folders are indexed before the first message is taken: an early question
    # must not get "I'll check" for a policy its documents state.
    await knowledge.start()
    orchestrator = build_orchestrator(settings, models, tools, knowledge, cluster)
    # Today's spend from the ledger, so a restart doesn't reset the day's budget.
    today = datetime.now(UTC).date()
    start = datetime(today.year, today.month, today.day, tzinfo=UTC)
    orchestrator.budgets.seed(today, await database.read(partial(spent_since, since=start)))
    orchestrator.budgets.start()
    queue: WorkQueue
    chat_locks: LockStore | None = None
    if cluster is None:
        queue = InProcessQueue(settings.worker.max_concurrent_conversations)
    else:
        queue = RedisQueue(
            cluster,
            database,
            partitions=settings.queue.partitions,
            lease_seconds=settings.queue.lease_seconds,
            sweep_seconds=settings.queue.sweep_seconds,
            max_concurrent=settings.worker.max_concurrent_conversations,
        )
        chat_locks = RedisLocks(cluster)
    # The live events: every process's reach the clients of every process (redis).
    hub = Hub() if cluster is None else RedisHub(cluster)
    pipeline = Pipeline.build(
        database,
        hub,
        queue,
        orchestrator,
        channels,
        settings.reply,
        chat_locks=chat_locks,
        summarise=registry_summariser(models),
    )
    if isinstance(hub, RedisHub):
        # A person's move on another process stops this one's bot at once, too.
        hub.on_owner_change(mirror_taken(pipeline.parts.taken))
        await hub.start()
    pipeline.start()
    for ch in channels.values():
        if cluster is not None:
            ch.share(cluster)
        ch.register(app, pipeline.host)
        await ch.start()
    agent_api = AgentApi(pipeline, settings.console)
    if cluster is not None:
        agent_api.auth.limits = SharedSignInLimits(cluster)
    agent_api.register(app)
    gauges = asyncio.create_task(agent_api.watch_gauges())
    if missing := missing_secrets(settings.console.webhooks):
        raise RuntimeError(f"set {', '.join(missing)}: the webhooks' signing secrets")
    webhooks = Webhooks(settings.console.webhooks, pipeline.hub, database)
    webhooks.start()
    services = Services(
        settings,
        engine,
        pipeline,
        db.session_factory(engine),
        orchestrator,
        models,
        channels,
        tools,
        knowledge,
    )
    app[SERVICES] = services
    await pipeline.recover()
    # Start-up builds ~10^5 long-lived objects (aiogram's and pydantic's models, routing
    # tables); left in the GC's oldest generation, every full collection walks them and
    # stalls the loop for 100+ ms. Freezing them keeps those pauses short.
    gc.collect()
    gc.freeze()
    # Young collections every 10,000 (not 700) new objects: an answer's short-lived objects
    # die before one runs instead of being promoted, and the older generations (the long
    # pauses) are collected far less often: `bench api --rate 100` spent a third of the time
    # in the GC, with shorter stalls.
    gc.set_threshold(10_000, 20, 20)
    metrics.watch_gc()
    lag_watch = asyncio.create_task(metrics.watch_loop_lag())
    log.info(
        "started",
        database=engine.url.render_as_string(hide_password=True),
        channels=sorted(channels),
    )
    yield
    lag_watch.cancel()
    # Graceful stop: the listener is closed already; let in-flight answers finish.
    finished = await queue.drain(settings.server.shutdown_grace_seconds)
    if not finished:
        log.warning("shutdown_grace_exceeded", detail="unfinished answers resume at next start")
    gauges.cancel()
    await webhooks.close()
    for ch in channels.values():
        await ch.close()
    await tools.aclose()
    await knowledge.aclose()
    await model_scope.aclose()
    await orchestrator.budgets.aclose()
    await orchestrator.runner.guards.aclose()
    await pipeline.close()
    await engine.dispose()
    if isinstance(hub, RedisHub):
        await hub.aclose()  # after the answers drained: their last events go out
    if cluster is not None:
        await cluster.aclose()


async def _close_streams(app: web.Application) -> None:
    if SERVICES in app:
        app[SERVICES].pipeline.hub.close_all()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app.get(SERVICES)
    if services is None:
        return error_response(503, "starting", "the service is starting")
    try:
        async with services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        current, heads = await db.migration_state(services.engine)
    except Exception as e:
        return error_response(503, "database_unreachable", str(e))
    if current != heads:
        return error_response(
            503,
            "migrations_pending",
            f"database at {sorted(current)}, code at {sorted(heads)}; run 'swarmdesk db upgrade'",
        )
    return web.json_response(
        {
            "status": "ready",
            "migration": sorted(current),
            "providers": _providers(services.settings),
            # Which process answered: with `serve --workers N` the port is shared.
            "process": f"{socket.gethostname()}:{os.getpid()}",
        }
    )


def _providers(settings: Settings) -> dict[str, str]:
    """Each configured provider: usable, or what it lacks; the simulator when it answers."""
    usable = {p.name for p in settings.live_providers()}
    out = {
        p.name: "usable" if p.name in usable else f"unusable: {p.api_key_env} is not set"
        for p in settings.providers
    }
    if settings.uses_simulator():
        out["simulator"] = "usable (demo: the built-in model simulator answers)"
    return out


async def metrics_view(request: web.Request, *, token: str | None) -> web.Response:
    if token is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
            raise ApiError(
                401, "unauthorized", "send the metrics token: Authorization: Bearer <token>"
            )
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(settings: Settings) -> web.Application:
    """Raises ConfigError when the configuration may not serve real shoppers (bot/safety.py)."""
    refused = safety.problems(settings)
    if refused:
        raise ConfigError(
            "this configuration may not serve shoppers:\n" + "\n".join(f"  - {p}" for p in refused)
        )
    for note in safety.warnings(settings):
        log.warning("unsafe_exposure", detail=note)
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    # Channel objects are built now (config errors surface before anything starts); they add
    # their routes at start-up, once the pipeline exists: aiohttp freezes the router after
    # the startup signals have run.
    app[CHANNELS] = build_channels(settings)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", partial(metrics_view, token=safety.metrics_token(settings)))
    register_console_assets(app)
    if settings.demo_shop.enabled:
        app.add_subapp("/demo-shop", build_demo_shop_app(settings.server.max_body_bytes))
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_close_streams)
    return app
