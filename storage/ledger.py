"""The cost ledger (llm_calls): what the models cost, for `swarmdesk costs` and for the day's
budget after a restart. Units for storage.executor."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from storage.statements import LLM_CALLS

_L = LLM_CALLS.c


@dataclass(frozen=True, slots=True)
class CostRow:
    tier: str | None
    model: str
    intent: str | None
    calls: int
    failed: int
    input_tokens: int
    output_tokens: int
    cost: float


def cost_summary(conn: Connection, since: datetime, until: datetime | None = None) -> list[CostRow]:
    """The ledger grouped by tier, provider/model and intent, most expensive first."""
    model = _L.provider + "/" + _L.model
    q = (
        select(
            _L.tier,
            model,
            _L.intent,
            func.count(),
            func.sum(case((_L.outcome == "ok", 0), else_=1)),
            func.coalesce(func.sum(_L.input_tokens), 0),
            func.coalesce(func.sum(_L.output_tokens), 0),
            func.coalesce(func.sum(_L.cost), 0.0),
        )
        .where(_L.created_at >= since)
        .group_by(_L.tier, model, _L.intent)
        .order_by(func.sum(_L.cost).desc())
    )
    if until is not None:
        q = q.where(_L.created_at < until)
    return [
        CostRow(t, m, i, int(n), int(f or 0), int(it), int(ot), float(c))
        for t, m, i, n, f, it, ot, c in conn.execute(q).all()
    ]


def spent_since(conn: Connection, since: datetime) -> float:
    """What every model call since `since` cost."""
    total = conn.execute(
        select(func.coalesce(func.sum(_L.cost), 0.0)).where(_L.created_at >= since)
    ).scalar()
    return float(total or 0.0)
