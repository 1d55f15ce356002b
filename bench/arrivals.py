"""When an open-loop load sends its messages."""

from __future__ import annotations

import random


def arrival_offsets(gaps: random.Random, rate: float, arrival: str, duration: float) -> list[float]:
    """Send times in seconds from the start, `rate` per second for `duration` seconds:
    `arrival` poisson draws each gap from `gaps`, fixed spaces them evenly."""
    offsets: list[float] = []
    t = gaps.expovariate(rate) if arrival == "poisson" else 0.0
    while t < duration:
        offsets.append(t)
        t += gaps.expovariate(rate) if arrival == "poisson" else 1.0 / rate
    return offsets
