"""Prometheus metrics of the Telegram channel (served with the others at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

UPDATES = Counter(
    "swarmdesk_telegram_updates_total",
    "Webhook/polling updates by type and what became of them "
    "(stored, duplicate, edit, ignored, unhandled, invalid)",
    ["account", "type", "outcome"],
)
API_CALLS = Counter(
    "swarmdesk_telegram_api_calls_total",
    "Bot API calls by method and outcome (ok, retry_after, error)",
    ["account", "method", "outcome"],
)
RETRY_AFTER_SECONDS = Counter(
    "swarmdesk_telegram_retry_after_seconds_total",
    "Seconds Telegram asked us to wait (429 retry_after), summed",
    ["account"],
)
