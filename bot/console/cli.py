"""`swarmdesk agents add|list|disable|enable|reset-password|token`: the shop's people."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from bot.console.auth import hash_password, new_token, secret_hash
from storage import agents, db, executor

LoadSettings = Callable[[argparse.Namespace], Any]  # -> bot.settings.Settings
MIN_PASSWORD = 10


def register_cli(subparsers: Any, *, load_settings: LoadSettings) -> None:
    a = subparsers.add_parser("agents", help="the people who answer in the console")
    asub = a.add_subparsers(dest="agents_command", required=True)
    add = asub.add_parser("add", help="add an agent (asks for a password)")
    add.add_argument("name")
    add.add_argument("--email", required=True)
    add.add_argument("--role", choices=["agent", "admin"], default="agent")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    asub.add_parser("list", help="list the agents")
    for name, helptext in (
        ("disable", "stop an agent signing in (sessions and tokens end at once)"),
        ("enable", "let a disabled agent sign in again"),
        ("reset-password", "set a new password (ends the agent's sessions)"),
        ("token", "make a personal API token for the agent API (shown once)"),
    ):
        p = asub.add_parser(name, help=helptext)
        p.add_argument("email")
        if name == "reset-password":
            p.add_argument("--password-stdin", action="store_true")
        if name == "token":
            p.add_argument("--name", default="api", help="what the token is for")
    a.set_defaults(func=partial(cmd_agents, load_settings=load_settings))


def cmd_agents(args: argparse.Namespace, *, load_settings: LoadSettings) -> int:
    settings = load_settings(args)
    return asyncio.run(_run(args, settings.database.url))


async def _run(args: argparse.Namespace, url: str) -> int:
    engine = db.create_engine(url)
    await db.upgrade(engine)
    database = executor.AsyncEngineDatabase(engine)
    try:
        return await _command(args, database)
    finally:
        await database.close()
        await engine.dispose()


async def _command(args: argparse.Namespace, database: executor.Database) -> int:
    command = args.agents_command
    if command == "list":
        for agent in await database.read(agents.list_agents):
            state = "" if agent.active else "  (disabled)"
            print(f"{agent.id:>4}  {agent.role:<6} {agent.email:<32} {agent.name}{state}")
        return 0
    if command == "add":
        password = _password(args.password_stdin)
        try:
            agent = await database.write(
                partial(
                    agents.add_agent,
                    name=args.name,
                    email=args.email,
                    role=args.role,
                    password_hash=await hash_password(password),
                )
            )
        except agents.AgentExists:
            return _fail(f"an agent with {args.email} exists already: see 'swarmdesk agents list'")
        print(f"added {agent.name} <{agent.email}> as {agent.role} (id {agent.id})")
        return 0
    if command in ("disable", "enable"):
        ok = await database.write(
            partial(agents.set_active, email=args.email, active=command == "enable")
        )
        return _done(ok, args.email, f"{command}d {args.email}")
    if command == "reset-password":
        password = _password(args.password_stdin)
        ok = await database.write(
            partial(
                agents.set_password, email=args.email, password_hash=await hash_password(password)
            )
        )
        return _done(ok, args.email, f"new password set for {args.email}; their sessions ended")
    found = await database.read(partial(agents.agent_for_sign_in, email=args.email))
    if found is None:
        return _done(False, args.email, "")
    token = new_token()
    await database.write(
        partial(
            agents.add_credential,
            agent_id=found[0].id,
            kind="token",
            secret_hash=secret_hash(token),
            name=args.name,
        )
    )
    print(token)
    print("(shown once: send it as 'Authorization: Bearer <token>')", file=sys.stderr)
    return 0


def _password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit(_fail("the two passwords differ"))
    if len(password) < MIN_PASSWORD:
        raise SystemExit(_fail(f"use a password of at least {MIN_PASSWORD} characters"))
    return password


def _done(ok: bool, email: str, message: str) -> int:
    if not ok:
        return _fail(f"no agent has the address {email}: see 'swarmdesk agents list'")
    print(message)
    return 0


def _fail(message: str) -> int:
    print(f"swarmdesk agents: {message}", file=sys.stderr)
    return 2
