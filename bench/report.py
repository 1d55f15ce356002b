"""The printed summary of a run: latency tables and the closing lines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt_ms(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def latency_header(title: str, width: int) -> str:
    return f"  {title:<{width}}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'n':>8}"


def latency_row(label: str, s: Mapping[str, Any], width: int) -> str:
    """One row of a `latency_header` table from a `summarize` result."""
    cells = "".join(f"{fmt_ms(s.get(k)):>9}" for k in ("p50", "p90", "p99", "max"))
    return f"  {label:<{width}}{cells}{s.get('count', 0):>8}"


def summary_tail(r: Mapping[str, Any], files: Sequence[Path]) -> list[str]:
    """The last lines of every summary: notes, problems, warnings, the files written."""
    lines = [f"  note: {note}" for note in r.get("notes", [])[:5]]
    if r["problems"]:
        lines.append("PROBLEMS: " + "; ".join(r["problems"]))
    lines += [f"WARNING: {warning}" for warning in r.get("warnings", [])]
    lines.append("results: " + ", ".join(str(f) for f in files))
    return lines


def log_counts(log: Mapping[str, Any], top: int = 6) -> str:
    """The `top` most frequent `level:event` counts of a `scan_json_log` result."""
    return ", ".join(f"{k} x{v}" for k, v in list(log["counts"].items())[:top])
