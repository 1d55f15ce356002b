"""The `swarmdesk` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib import resources
from typing import Any

import structlog
from pydantic import ValidationError

from bot import logging as logs
from bot.console.cli import register_cli as register_agents_cli
from bot.knowledge_eval import register_cli as register_eval_knowledge_cli
from bot.knowledge_faq import check_faq
from bot.models import fast_models
from bot.settings import ConfigError, Settings, load_settings
from channels.telegram.cli import register_cli as register_telegram_cli
from knowledge.cli import register_cli as register_kb_cli
from orchestration.routing.cli import register_cli as register_routing_cli
from simulator import cli as simulator_cli

log = structlog.get_logger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    from bot.config_check import explain

    try:
        return load_settings(args.config)
    except (ConfigError, ValidationError) as e:
        print(explain(e, args.config), file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.server import serve

    settings = _settings(args)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    logs.configure(settings.log.format, settings.log.level)
    workers = getattr(args, "workers", 1)
    slot: int | None = getattr(args, "worker_slot", None)
    if slot is None and workers != 1:
        return _serve_workers(args, settings, workers)
    if slot is not None:
        # One of `serve --workers N`'s children: the parent migrated the database already.
        settings.database.migrate_on_start = False
        structlog.contextvars.bind_contextvars(worker=slot)
    try:
        asyncio.run(serve(settings, reuse_port=slot is not None))
    except ConfigError as e:
        print(f"swarmdesk: {e}\n(`swarmdesk config check` explains)", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"swarmdesk: cannot listen on {settings.server.host}:{settings.server.port}: {e}; "
            "pick another with --port",
            file=sys.stderr,
        )
        return 1
    return 0


def _serve_workers(args: argparse.Namespace, settings: Settings, workers: int) -> int:
    """The parent of `serve --workers N` (bot/supervisor.py)."""
    from bot import safety
    from bot.supervisor import PortTaken, Supervisor, reserve_port
    from storage import db

    if workers < 1:
        print("swarmdesk: --workers must be 1 or more", file=sys.stderr)
        return 2
    if not settings.distributed:
        print(
            f"swarmdesk: --workers {workers} runs {workers} processes, which must share the "
            "work: set queue.backend: redis (queue.url: redis://host:6379/0) and database.url "
            "to PostgreSQL (postgresql+asyncpg://user@host/db); with queue.backend: memory run "
            "one process (no --workers)",
            file=sys.stderr,
        )
        return 2
    # Refused here once rather than by every child in a restart loop.
    if refused := safety.problems(settings):
        print(
            "swarmdesk: this configuration may not serve shoppers:\n"
            + "\n".join(f"  - {p}" for p in refused),
            file=sys.stderr,
        )
        return 2
    host, port = settings.server.host, settings.server.port
    try:
        reservation = reserve_port(host, port)
    except PortTaken as e:
        print(
            f"swarmdesk: cannot listen on {e.strerror}; pick another with --port", file=sys.stderr
        )
        return 1
    port = int(reservation.getsockname()[1])
    if settings.database.migrate_on_start:
        try:
            db.upgrade_blocking(settings.database.url)
        except Exception as e:  # unreachable, refused, a failing migration: say which
            where = settings.database.url.rsplit("@", 1)[-1]
            print(f"swarmdesk: cannot migrate the database ({where}): {e}", file=sys.stderr)
            reservation.close()
            return 1
    base = [sys.executable, "-m", "bot.cli"]
    if args.config:
        base += ["--config", str(args.config)]

    def argv(slot: int) -> list[str]:
        return [*base, "serve", "--host", host, "--port", str(port), "--worker-slot", str(slot)]

    supervisor = Supervisor(workers, argv, stop_grace_s=settings.server.shutdown_grace_seconds)
    log.info("workers_starting", workers=workers, url=f"http://{host}:{port}")
    try:
        return asyncio.run(supervisor.run())
    finally:
        reservation.close()


def cmd_db(args: argparse.Namespace) -> int:
    from storage import db

    settings = _settings(args)
    logs.configure(settings.log.format, settings.log.level)
    if args.db_command == "upgrade":
        db.upgrade_blocking(settings.database.url, args.revision)
        print(f"database at {args.revision}: {settings.database.url}")
        return 0

    async def state() -> tuple[set[str], set[str]]:
        engine = db.create_engine(settings.database.url)
        try:
            return await db.migration_state(engine)
        finally:
            await engine.dispose()

    current, heads = asyncio.run(state())
    print(f"database: {sorted(current) or 'empty'}; code head: {sorted(heads)}")
    return 0 if current == heads else 1


def cmd_config(args: argparse.Namespace) -> int:
    from bot.config_check import check

    if args.config_command == "example":
        text = resources.files("bot").joinpath("swarmdesk.example.yaml").read_text("utf-8")
        sys.stdout.write(text)
        return 0
    ok, report = check(args.file or args.config)
    print(report)
    return 0 if ok else 1


def cmd_costs(args: argparse.Namespace) -> int:
    from bot.costs import report, table

    settings = _settings(args)
    rows = report(settings.database.url, args.since, args.until)
    print(
        f"model spend since {args.since:%Y-%m-%d %H:%M} UTC"
        + (f" until {args.until:%Y-%m-%d %H:%M} UTC" if args.until else "")
    )
    print(table(rows))
    return 0


def _routing_examples(settings: Settings) -> list[dict[str, Any]]:
    """What agents labeled in the console (storage/routing_examples.py), for `routing train`."""
    from storage import db
    from storage.routing_examples import training_lines

    async def run() -> list[dict[str, Any]]:
        engine = db.create_engine(settings.database.url)
        try:
            await db.upgrade(engine)
            async with engine.connect() as conn:
                return await conn.run_sync(training_lines)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_simulator(args: argparse.Namespace) -> int:
    logs.configure("auto", "info")
    simulator_cli.run(args)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarmdesk", description="LLM customer service for WeChat, Telegram and your web site"
    )
    p.add_argument(
        "--config",
        "-c",
        help="YAML config file (default: $SWARMDESK_CONFIG, "
        "else ./swarmdesk.yaml if present, else built-in defaults)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N processes sharing the port (SO_REUSEPORT), one per core; needs "
        "queue.backend: redis and PostgreSQL",
    )
    # Internal: marks one of --workers' children (shares the port, skips the migrations).
    s.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("db", help="database migrations")
    dsub = d.add_subparsers(dest="db_command", required=True)
    up = dsub.add_parser("upgrade", help="apply migrations (done at start too)")
    up.add_argument("revision", nargs="?", default="head")
    dsub.add_parser("current", help="show the applied and the latest revision")
    d.set_defaults(func=cmd_db)

    c = sub.add_parser("config", help="check or start a config file")
    csub = c.add_subparsers(dest="config_command", required=True)
    ck = csub.add_parser("check", help="validate a config file and explain every mistake")
    ck.add_argument("file", nargs="?")
    csub.add_parser("example", help="print a commented example config")
    c.set_defaults(func=cmd_config)

    from bot.costs import parse_when

    k = sub.add_parser("costs", help="the cost ledger by tier, model and intent")
    k.add_argument(
        "--since",
        type=parse_when,
        default=parse_when("1d"),
        help="2026-11-20, 2026-11-20T08:00, or 24h / 7d back (default: 1d)",
    )
    k.add_argument("--until", type=parse_when, default=None)
    k.set_defaults(func=cmd_costs)

    m = sub.add_parser("simulator", help="run the OpenAI-compatible model simulator")
    simulator_cli.add_arguments(m)
    m.set_defaults(func=cmd_simulator)
    register_routing_cli(
        sub, load_settings=_settings, open_models=fast_models, stored_examples=_routing_examples
    )
    register_agents_cli(sub, load_settings=_settings)
    register_telegram_cli(sub, load_settings=_settings, serve=cmd_serve)
    register_kb_cli(sub, load_settings=_settings, check_faq=check_faq)
    register_eval_knowledge_cli(sub, load_settings=_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
