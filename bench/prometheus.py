"""The service's Prometheus metrics: scraping, parsing, counters over a window."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from bench.http_client import fetch_text


async def service_metrics(http: aiohttp.ClientSession, svc_url: str) -> dict[str, float]:
    text = await fetch_text(http, f"{svc_url}/metrics")
    return parse_samples(text) if text is not None else {}


def parse_samples(text: str, prefix: str = "swarmdesk_") -> dict[str, float]:
    """Samples of metrics starting with `prefix` ('name{labels}' -> value); buckets dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix) or "_bucket{" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """after - before for every sample of `after` (gauges are given as they are after)."""
    out: dict[str, float] = {}
    for name, value in after.items():
        base = name.split("{", 1)[0]
        if base.endswith(("_total", "_sum", "_count")):
            out[name] = round(value - before.get(name, 0.0), 6)
        else:
            out[name] = value
    return out


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts (le -> count) of a Prometheus histogram."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the q-quantile."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le * 1000.0
    return None
