"""The delivery log of outgoing webhooks: one row per attempt. Units for storage.executor."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection

from storage.models import WebhookDelivery

DELIVERIES = cast(Table, WebhookDelivery.__table__)
_D = DELIVERIES.c


def log_attempt(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(insert(DELIVERIES).values(**row))


def recent(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    rows = conn.execute(select(DELIVERIES).order_by(_D.id.desc()).limit(limit)).mappings()
    return [{**r, "created_at": r["created_at"].isoformat()} for r in rows]
