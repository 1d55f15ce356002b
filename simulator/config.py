"""What the simulator is told: pacing, reply length and fault rates, and what it counts.

The configuration is live: `POST /_sim/config` changes fields of the running simulator,
checked by `config_value` so a bad value is a 400 instead of a broken simulator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The faults a real provider produces, as the simulator names them.
FAULTS = ("429", "500", "hang", "cut", "slow")
# The config fields that are probabilities of a fault, and the fault of each.
RATE_FIELDS = ("fail_rate", "rate_limit_rate", "hang_rate", "cut_rate")
RATE_FAULTS = ("500", "429", "hang", "cut")
# Longest reply, whatever a directive or the config asks for (replies are cached).
MAX_REPLY_TOKENS = 32_768


@dataclass
class SimulatorConfig:
    first_token_ms: float = 300
    tokens_per_second: float = 50  # 0 or less: no pacing, the whole reply at once
    reply_tokens: int = 40
    fail_rate: float = 0  # probability of a 500
    rate_limit_rate: float = 0  # probability of a 429
    hang_rate: float = 0  # probability of accepting and never answering
    cut_rate: float = 0  # probability of closing the stream half-way, without [DONE]
    retry_after_s: float = 1
    seed: int | None = None


@dataclass
class SimulatorStats:
    requests: int = 0  # chat completion requests that were well-formed
    completed: int = 0  # replies sent in full
    disconnected: int = 0  # clients that went away mid-reply
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active: int = 0  # requests being served right now
    peak_active: int = 0  # most requests served at once (shows calls ran in parallel)
    continuations: int = 0  # requests to continue a cut reply (simulator.continuation)
    prefix_continuations: int = 0  # ...of them in a provider's prefix mode (prefix/partial)
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULTS, 0))

    def reset(self) -> None:
        fresh = SimulatorStats()
        for f in dataclasses.fields(self):
            if f.name != "active":  # in-flight requests are still in flight
                setattr(self, f.name, getattr(fresh, f.name))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def optional_number(value: Any) -> float | None:
    """A non-negative number from JSON, or None; anything else is a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a non-negative number, got {value!r}")
    return float(value)


def config_value(key: str, value: Any) -> Any:
    """`value` checked and converted for the config field `key` (a ValueError if bad)."""
    if key == "seed":
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError("must be an integer or null")
    number = optional_number(value)
    if number is None:
        raise ValueError("must be a number")
    if key in RATE_FIELDS and number > 1:
        raise ValueError("must be a probability from 0 to 1")
    if key == "reply_tokens":
        if number != int(number) or number > MAX_REPLY_TOKENS:
            raise ValueError(f"must be an integer up to {MAX_REPLY_TOKENS}")
        return int(number)
    return number
