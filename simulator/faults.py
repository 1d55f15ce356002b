"""How one request will be answered: which fault (if any), how fast, how long.

A fault comes from, in this order: the FIFO queue filled through `POST /_sim/faults`; an
inline directive in the last user message (`[[sim:fault=cut]]`), which lets an end-to-end
test steer one message through the whole service; the configured random rates. Directives
also set the pacing of one request (`delay_ms`, `tps`, `tokens`, `retry_after`) and tag it
for the timings a benchmark reads (`tag`).
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from dataclasses import dataclass

from simulator.config import FAULTS, MAX_REPLY_TOKENS, RATE_FAULTS, RATE_FIELDS, SimulatorConfig

# First-token delay of a queued "slow" fault that does not say how slow.
_SLOW_DEFAULT_MS = 5000.0


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    retry_after: float | None = None
    first_token_ms: float | None = None


@dataclass(slots=True)
class Plan:
    """How one request will be answered."""

    fault: str | None
    retry_after: float
    first_token_s: float
    tokens_per_second: float
    reply_tokens: int
    tag: str | None = None
    arrived: float = 0.0  # time.perf_counter() when the request came in


def plan_request(
    config: SimulatorConfig, queue: deque[Fault], rng: random.Random, directives: dict[str, str]
) -> Plan:
    """Queued fault first, then an inline one, then the configured random rates."""
    fault: Fault | None = None
    if queue:
        fault = queue.popleft()
    elif directives.get("fault") in FAULTS:
        fault = Fault(directives["fault"])
    elif any(getattr(config, name) > 0 for name in RATE_FIELDS):
        r = rng.random()
        for name, kind in zip(RATE_FIELDS, RATE_FAULTS, strict=True):
            rate: float = getattr(config, name)
            if r < rate:
                fault = Fault(kind)
                break
            r -= rate

    first_token_ms = config.first_token_ms
    if fault is not None and fault.kind == "slow":
        first_token_ms = (
            fault.first_token_ms if fault.first_token_ms is not None else _SLOW_DEFAULT_MS
        )
    retry_after = config.retry_after_s
    if fault is not None and fault.retry_after is not None:
        retry_after = fault.retry_after
    return Plan(
        fault=fault.kind if fault else None,
        retry_after=_number(directives.get("retry_after"), retry_after),
        first_token_s=_number(directives.get("delay_ms"), first_token_ms) / 1000,
        tokens_per_second=_number(directives.get("tps"), config.tokens_per_second),
        reply_tokens=min(
            MAX_REPLY_TOKENS, int(_number(directives.get("tokens"), config.reply_tokens))
        ),
        tag=directives.get("tag") or None,
    )


def _number(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return number if number >= 0 and math.isfinite(number) else default


# --- inline directives ------------------------------------------------------------------

_DIRECTIVE_RE = re.compile(r"\[\[sim:([^\[\]]*)\]\]")
_DIRECTIVE_SPLIT_RE = re.compile(r"[,;\s]+")


def parse_directives(text: str) -> tuple[dict[str, str], str]:
    """(`[[sim:key=value]]` settings, the text without them). Later settings win."""
    if "[[sim:" not in text:
        return {}, text
    found: dict[str, str] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        for item in _DIRECTIVE_SPLIT_RE.split(match.group(1)):
            key, sep, value = item.partition("=")
            if sep:
                found[key.strip().lower()] = value.strip()
    return found, _DIRECTIVE_RE.sub("", text)
