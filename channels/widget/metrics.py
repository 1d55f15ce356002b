"""Prometheus metrics of the widget channel (served with the others at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("swarmdesk_widget_connections", "Open widget connections", ["transport"])
REFUSED = Counter(
    "swarmdesk_widget_refused_total",
    "Widget requests and frames refused (unknown site, origin, rate limit, bad frame...)",
    ["reason"],
)
DELTA_DELIVERY = Histogram(
    "swarmdesk_widget_delta_delivery_seconds",
    "From a delta leaving orchestration to its frame written to the visitor's socket",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
