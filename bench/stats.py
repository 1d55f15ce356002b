"""Statistics of latencies: percentiles and the summary every result holds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    rank = (len(s) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def summarize(values: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of `values` (None when there are none)."""
    out: dict[str, float | int | None] = {"count": len(values)}
    if not values:
        out.update(dict.fromkeys(("mean", "p50", "p90", "p99", "max")))
        return out
    s = sorted(values)
    out["mean"] = round(sum(s) / len(s), digits)
    for p in PERCENTILES:
        out[f"p{p:g}"] = round(percentile(s, p), digits)
    out["max"] = round(s[-1], digits)
    return out


def overhead_ms(
    measured: Mapping[str, Any], baseline: Mapping[str, Any]
) -> dict[str, float | None]:
    """p50 and p99 of two `summarize` results, `measured` minus `baseline`."""
    out: dict[str, float | None] = {}
    for p in ("p50", "p99"):
        a, b = measured.get(p), baseline.get(p)
        out[p] = round(float(a) - float(b), 2) if a is not None and b is not None else None
    return out
