"""matplotlib helpers of the result plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.stats import percentile


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percentile_curve(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """(percentiles, values) points for a latency-by-percentile plot, denser at the tail."""
    if not values:
        return [], []
    s = sorted(values)
    ps = [float(p) for p in range(0, 90)] + [90 + i * 0.1 for i in range(0, 100)] + [100.0]
    return ps, [percentile(s, p) for p in ps]


def plot_percentiles(
    ax: Any, series: Mapping[str, Sequence[float]], ylabel: str, *, tail: float = 0.1
) -> None:
    """Latency by percentile: x is the share of values slower than y, on a log scale down to
    `tail` percent, so the tail stretches out to the right."""
    for label, values in series.items():
        ps, vs = percentile_curve(values)
        if ps:
            ax.plot([100 - x for x in ps[:-1]], vs[:-1], label=f"{label} (n={len(values)})")
    ax.set_xscale("log")
    ax.set_xlim(100, tail)
    ticks = [t for t in (100, 50, 10, 1, 0.1, 0.01) if t >= tail]
    ax.set_xticks(ticks, [f"p{100 - t:g}" for t in ticks])
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
