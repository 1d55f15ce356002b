"""Agents, their passwords (argon2 hashes, made by the caller) and credentials: console
sessions and personal API tokens, stored as SHA-256 hashes of the secret. Units for
storage.executor."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage.models import Agent, AgentCredential, utcnow
from storage.rows import AgentRow

AGENTS = cast(Table, Agent.__table__)
CREDENTIALS = cast(Table, AgentCredential.__table__)
_A, _CR = AGENTS.c, CREDENTIALS.c
AGENT_COLUMNS = tuple(_A[f.name] for f in fields(AgentRow))


class AgentExists(ValueError):
    """An agent with this e-mail address exists already."""


def add_agent(
    conn: Connection, name: str, email: str, role: str, password_hash: str | None
) -> AgentRow:
    try:
        with conn.begin_nested():
            row = conn.execute(
                insert(AGENTS)
                .values(
                    name=name,
                    email=email.lower(),
                    role=role,
                    password_hash=password_hash,
                    active=True,
                    created_at=utcnow(),
                )
                .returning(*AGENT_COLUMNS)
            ).one()
    except IntegrityError as e:
        raise AgentExists(email) from e
    return AgentRow(*row)


def list_agents(conn: Connection) -> list[AgentRow]:
    return [AgentRow(*r) for r in conn.execute(select(*AGENT_COLUMNS).order_by(_A.id))]


def get_agent(conn: Connection, agent_id: int) -> AgentRow | None:
    row = conn.execute(select(*AGENT_COLUMNS).where(_A.id == agent_id)).first()
    return AgentRow(*row) if row is not None else None


def agent_for_sign_in(conn: Connection, email: str) -> tuple[AgentRow, str | None] | None:
    """The agent with this address and its password hash (active or not: the caller says
    why it refuses)."""
    row = conn.execute(
        select(*AGENT_COLUMNS, _A.password_hash).where(_A.email == email.lower())
    ).first()
    if row is None:
        return None
    *agent, password_hash = row
    return AgentRow(*agent), password_hash


def set_password(conn: Connection, email: str, password_hash: str) -> bool:
    """A new password; every session and token of the agent ends with the old one."""
    agent_id = conn.execute(
        update(AGENTS)
        .where(_A.email == email.lower())
        .values(password_hash=password_hash)
        .returning(_A.id)
    ).scalar()
    if agent_id is None:
        return False
    conn.execute(delete(CREDENTIALS).where(_CR.agent_id == agent_id, _CR.kind == "session"))
    return True


def set_active(conn: Connection, email: str, active: bool) -> bool:
    done = conn.execute(
        update(AGENTS).where(_A.email == email.lower()).values(active=active).returning(_A.id)
    ).scalar()
    return done is not None


def add_credential(
    conn: Connection,
    agent_id: int,
    kind: str,
    secret_hash: str,
    *,
    csrf_token: str | None = None,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> None:
    conn.execute(
        insert(CREDENTIALS).values(
            agent_id=agent_id,
            kind=kind,
            secret_hash=secret_hash,
            csrf_token=csrf_token,
            name=name,
            created_at=utcnow(),
            expires_at=expires_at,
        )
    )


def agent_by_credential(
    conn: Connection, kind: str, secret_hash: str, now: datetime
) -> tuple[AgentRow, str | None] | None:
    """The active agent a live credential belongs to, with the session's CSRF token."""
    row = conn.execute(
        select(*AGENT_COLUMNS, _CR.csrf_token, _CR.expires_at)
        .join_from(CREDENTIALS, AGENTS, _A.id == _CR.agent_id)
        .where(_CR.kind == kind, _CR.secret_hash == secret_hash, _A.active.is_(True))
    ).first()
    if row is None:
        return None
    *agent, csrf, expires_at = row
    if expires_at is not None and _aware(expires_at) <= now:
        return None
    return AgentRow(*agent), csrf


def delete_credential(conn: Connection, secret_hash: str) -> None:
    conn.execute(delete(CREDENTIALS).where(_CR.secret_hash == secret_hash))


def _aware(when: datetime) -> datetime:
    # SQLite gives naive UTC back.
    return when if when.tzinfo is not None else when.replace(tzinfo=utcnow().tzinfo)
