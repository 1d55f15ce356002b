"""`swarmdesk telegram ...`: register webhooks, inspect them, or poll during development.

swarmdesk telegram set-webhook --url https://shop.example.com   # each bot: URL + its path
swarmdesk telegram info                                          # what Telegram has now
swarmdesk telegram delete-webhook
swarmdesk telegram poll                                          # serve, with long polling
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from channels.telegram.config import TelegramBotSettings, TelegramSettings

LoadSettings = Callable[[argparse.Namespace], Any]  # -> bot.settings.Settings
Serve = Callable[[argparse.Namespace], int]


def register_cli(
    subparsers: Any, *, load_settings: LoadSettings, serve: Serve
) -> argparse.ArgumentParser:
    """Add `telegram` and its sub-commands to the `swarmdesk` parser."""
    t: argparse.ArgumentParser = subparsers.add_parser(
        "telegram", help="connect Telegram bots: register webhooks, inspect, poll"
    )
    sub = t.add_subparsers(dest="telegram_command", required=True)

    def bot_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bot", metavar="ACCOUNT", help="only this bot (default: every bot)")

    s = sub.add_parser("set-webhook", help="tell Telegram where to post each bot's updates")
    s.add_argument(
        "--url", help="public https base URL of this service (default: server.public_url)"
    )
    s.add_argument("--drop-pending-updates", action="store_true")
    s.add_argument("--max-connections", type=int, default=None, help="1-100 (Telegram: 40)")
    bot_arg(s)
    s.set_defaults(func=lambda a: _run(a, load_settings, "set-webhook"))

    d = sub.add_parser("delete-webhook", help="stop Telegram posting updates to the service")
    d.add_argument("--drop-pending-updates", action="store_true")
    bot_arg(d)
    d.set_defaults(func=lambda a: _run(a, load_settings, "delete-webhook"))

    i = sub.add_parser("info", help="show each bot and the webhook Telegram has for it")
    bot_arg(i)
    i.set_defaults(func=lambda a: _run(a, load_settings, "info"))

    p = sub.add_parser(
        "poll",
        help="run the service with long polling instead of a webhook (development; deletes "
        "the webhook)",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=lambda a: _poll(a, serve))
    return t


def _run(args: argparse.Namespace, load_settings: LoadSettings, action: str) -> int:
    settings = load_settings(args)
    section: TelegramSettings = settings.channels.telegram
    bots = _chosen(section, args.bot)
    if bots is None:
        return 2
    if not section.enabled:
        print(
            "note: channels.telegram.enabled is false; the service ignores Telegram until you "
            "enable it",
            file=sys.stderr,
        )
    need_secret = action == "set-webhook"
    problems = [p for b in bots if (p := b.credentials_problem(need_secret=need_secret))]
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    from channels.telegram.admin import run_all  # aiogram loads only for these commands

    return 0 if asyncio.run(run_all(action, bots, args, settings)) else 1


def _chosen(section: TelegramSettings, account: str | None) -> list[TelegramBotSettings] | None:
    if not section.bots:
        print(
            "error: channels.telegram.bots is empty; add a bot (account, token_env, "
            "secret_token_env) to the config - see 'Connecting Telegram' in README.md",
            file=sys.stderr,
        )
        return None
    if account is None:
        return list(section.bots)
    chosen = [b for b in section.bots if b.account == account]
    if not chosen:
        known = ", ".join(b.account for b in section.bots)
        print(
            f"error: no bot '{account}' in channels.telegram.bots (have: {known})", file=sys.stderr
        )
        return None
    return chosen


def _poll(args: argparse.Namespace, serve: Serve) -> int:
    # Environment settings win over the YAML file: switch the section to polling for this run.
    os.environ["SWARMDESK_CHANNELS__TELEGRAM__ENABLED"] = "true"
    os.environ["SWARMDESK_CHANNELS__TELEGRAM__MODE"] = "polling"
    print(
        "polling Telegram (development): each bot's webhook is deleted; run "
        "'swarmdesk telegram set-webhook' to go back",
        file=sys.stderr,
    )
    return serve(args)
