"""`swarmdesk costs`: the cost ledger as a table by tier, model and intent."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime, timedelta
from functools import partial

from storage import db
from storage.ledger import CostRow, cost_summary


def parse_when(value: str) -> datetime:
    """'2026-11-20', '2026-11-20T08:00', or a span back from now: '24h', '7d', '30m'."""
    v = value.strip()
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if v[:-1].isdigit() and v[-1:] in units:
        return datetime.now(UTC) - timedelta(**{units[v[-1]]: int(v[:-1])})
    try:
        when = datetime.fromisoformat(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a date: use 2026-11-20, 2026-11-20T08:00, or 24h / 7d"
        ) from e
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def table(rows: list[CostRow]) -> str:
    head = ("tier", "model", "intent", "calls", "failed", "in tok", "out tok", "cost")
    body = [
        (
            r.tier or "-",
            r.model,
            r.intent or "-",
            str(r.calls),
            str(r.failed),
            str(r.input_tokens),
            str(r.output_tokens),
            f"{r.cost:.4f}",
        )
        for r in rows
    ]
    total = sum(r.cost for r in rows)
    body.append(
        (
            "total",
            "",
            "",
            str(sum(r.calls for r in rows)),
            str(sum(r.failed for r in rows)),
            str(sum(r.input_tokens for r in rows)),
            str(sum(r.output_tokens for r in rows)),
            f"{total:.4f}",
        )
    )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
    return "\n".join(lines)


def report(url: str, since: datetime, until: datetime | None) -> list[CostRow]:
    async def run() -> list[CostRow]:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(partial(cost_summary, since=since, until=until))
        finally:
            await engine.dispose()

    return asyncio.run(run())
