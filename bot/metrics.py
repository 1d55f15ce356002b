"""Prometheus metrics, served at GET /metrics (README: Reading the metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60)

MESSAGES_IN = Counter("swarmdesk_messages_received_total", "Inbound messages stored", ["channel"])
DUPLICATES = Counter(
    "swarmdesk_redeliveries_total", "Redelivered messages acknowledged and ignored", ["channel"]
)
REPLIES = Counter(
    "swarmdesk_replies_total",
    "Bot answers by outcome (model, degraded, abandoned, human)",
    ["channel", "outcome"],
)
FIRST_DELTA = Histogram(
    "swarmdesk_reply_first_delta_seconds",
    "From the worker taking a message to the first text of the answer",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
)
REPLY_TIME = Histogram(
    "swarmdesk_reply_seconds",
    "From the worker taking a message to the stored final answer",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
)
LLM_CALLS = Counter(
    "swarmdesk_llm_calls_total", "Model attempts by outcome", ["provider", "model", "outcome"]
)
LLM_TOKENS = Counter(
    "swarmdesk_llm_tokens_total", "Tokens billed", ["provider", "model", "direction"]
)
LLM_COST = Counter("swarmdesk_llm_cost_total", "Money spent on models", ["provider", "model"])
IN_FLIGHT = Gauge("swarmdesk_replies_in_flight", "Answers being written right now")
STREAM_CLIENTS = Gauge("swarmdesk_stream_clients", "Connected streaming clients (SSE/WebSocket)")
