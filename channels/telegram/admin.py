"""What `swarmdesk telegram set-webhook / delete-webhook / info` do, bot by bot.

Kept apart from cli.py so the `swarmdesk` command loads aiogram only when it needs it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from aiogram.exceptions import TelegramAPIError
from aiogram.methods import DeleteWebhook, GetMe, GetWebhookInfo, SetWebhook

from channels.telegram.client import BotClient
from channels.telegram.config import TelegramBotSettings
from channels.telegram.updates import ALLOWED_UPDATES


async def run_all(
    action: str, bots: list[TelegramBotSettings], args: argparse.Namespace, settings: Any
) -> bool:
    """Run `action` for each bot; every failure is printed, none stops the others."""
    fn = ACTIONS[action]
    ok = True
    for b in bots:
        token = b.token()
        assert token is not None
        client = BotClient(b, token)
        try:
            ok = await fn(client, args, settings) and ok
        except TelegramAPIError as e:
            print(f"{b.account}: Telegram refused: {e.message}", file=sys.stderr)
            ok = False
        finally:
            await client.close()
    return ok


async def set_webhook(client: BotClient, args: argparse.Namespace, settings: Any) -> bool:
    base = args.url or settings.server.public_url
    if not base:
        print(
            "error: pass --url https://your.domain (or set server.public_url): the address "
            "Telegram can reach this service at",
            file=sys.stderr,
        )
        return False
    url = base.rstrip("/") + client.settings.path
    await client.call(
        SetWebhook(
            url=url,
            secret_token=client.settings.secret_token(),
            allowed_updates=ALLOWED_UPDATES,
            drop_pending_updates=args.drop_pending_updates or None,
            max_connections=args.max_connections,
        )
    )
    name = await client.username()
    print(f"{client.account}: @{name} -> {url}")
    return True


async def delete_webhook(client: BotClient, args: argparse.Namespace, settings: Any) -> bool:
    await client.call(DeleteWebhook(drop_pending_updates=args.drop_pending_updates or None))
    print(f"{client.account}: webhook deleted")
    return True


async def info(client: BotClient, args: argparse.Namespace, settings: Any) -> bool:
    me = await client.call(GetMe())
    info = await client.call(GetWebhookInfo())
    print(f"{client.account}: @{me.username} (id {me.id})")
    if info.url:
        expected = client.settings.path
        match = "" if info.url.endswith(expected) else f"  (this config expects ...{expected})"
        print(f"  webhook: {info.url}{match}")
    else:
        print("  webhook: none (run 'swarmdesk telegram set-webhook --url https://...')")
    print(f"  pending updates: {info.pending_update_count}")
    if info.last_error_date:
        when = info.last_error_date
        stamp = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
        print(f"  last error: {stamp.isoformat()} {info.last_error_message or ''}".rstrip())
    if info.allowed_updates:
        print(f"  allowed updates: {', '.join(info.allowed_updates)}")
    return True


ACTIONS = {"set-webhook": set_webhook, "delete-webhook": delete_webhook, "info": info}
