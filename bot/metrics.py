"""Prometheus metrics, served at GET /metrics (README: Reading the metrics)."""

from __future__ import annotations

import asyncio
import gc
import time

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
OWNER_CHANGES = Counter(
    "swarmdesk_owner_changes_total",
    "Agents' moves on conversations (claim, assign, unassign, resolve, handback)",
    ["action"],
)
HANDOFFS = Counter("swarmdesk_handoffs_total", "Conversations handed to a person", ["reason"])
WAITING = Gauge("swarmdesk_conversations_waiting", "Conversations waiting for a person now")
SATISFACTION = Gauge(
    "swarmdesk_satisfaction_average", "Average rating (1-5) of conversations rated in 24 h"
)
FIRST_HUMAN_REPLY = Histogram(
    "swarmdesk_first_human_reply_seconds",
    "From a handoff request to the first reply of a person",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
# The distributed mode's work queue (queue.backend: redis).
PARTITIONS_HELD = Gauge(
    "swarmdesk_work_partitions_held", "Work partitions this process holds the lease of"
)
QUEUE_ERRORS = Counter(
    "swarmdesk_work_queue_errors_total", "Work queue operations Redis refused", ["operation"]
)
QUEUE_SWEPT = Counter(
    "swarmdesk_work_swept_total",
    "Stored messages the queue had lost (a crash, a Redis restart), queued from the database",
)
STREAM_CLIENTS = Gauge("swarmdesk_stream_clients", "Connected streaming clients (SSE/WebSocket)")

# What makes a busy process answer late, for the tail of the latencies above.
_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
GC_PAUSE = Histogram(
    "swarmdesk_gc_pause_seconds",
    "Garbage collections (the whole process stands still meanwhile)",
    ["generation"],
    buckets=_PAUSE_BUCKETS,
)
LOOP_LAG = Histogram(
    "swarmdesk_event_loop_lag_seconds",
    "How late the event loop ran a timer set for now (sampled twice a second)",
    buckets=_PAUSE_BUCKETS,
)
_LOOP_LAG_EVERY_S = 0.5
_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        GC_PAUSE.labels(str(info.get("generation", "?"))).observe(
            time.perf_counter() - _gc_started.pop()
        )


def watch_gc() -> None:
    """Time every garbage collection (idempotent)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


async def watch_loop_lag() -> None:
    """Run for the life of the service: a timer's lateness is what every callback waits."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + _LOOP_LAG_EVERY_S
        await asyncio.sleep(_LOOP_LAG_EVERY_S)
        LOOP_LAG.observe(max(loop.time() - due, 0.0))
