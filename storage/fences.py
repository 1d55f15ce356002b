"""Fencing tokens of the work partitions (queue.backend: redis; bot/distributed/queue.py).

A process that takes a partition's lease raises the partition's token here and keeps the new
value; the transaction that stores an answer checks that the token is still its own. A
process that lost the lease without knowing it (a long pause, a network cut) therefore cannot
store an answer the partition's new holder is also writing. Units for storage.executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from storage.models import WorkFence, utcnow

FENCES = cast(Table, WorkFence.__table__)
F = FENCES.c


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a process held when it began an answer."""

    partitions: int
    partition: int
    token: int


class FenceLost(Exception):
    """Another process took the partition over: this one must not store or send."""


def take_partition(conn: Connection, partitions: int, partition: int, holder: str) -> Fence:
    """Raise the partition's token (the caller holds its lease now) and return it."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    stmt = insert(FENCES).values(
        partitions=partitions, partition=partition, token=1, holder=holder, updated_at=now
    )
    upsert = stmt.on_conflict_do_update(
        index_elements=[F.partitions, F.partition],
        set_={"token": F.token + 1, "holder": holder, "updated_at": now},
    ).returning(F.token)
    token = int(conn.execute(upsert).scalar_one())
    return Fence(partitions, partition, token)


def check(conn: Connection, fence: Fence) -> None:
    """Raise FenceLost unless `fence` is still the partition's newest token. Locks the row
    until the transaction ends (PostgreSQL), so a takeover waits for an answer being stored."""
    q = select(F.token).where(F.partitions == fence.partitions, F.partition == fence.partition)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(read=True)
    token = conn.execute(q).scalar()
    if token != fence.token:
        raise FenceLost(f"partition {fence.partition} is now held with token {token}")
