"""The running simulator's state, shared by its HTTP handlers through the aiohttp app."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections import deque

from aiohttp import web

from simulator.config import SimulatorConfig, SimulatorStats
from simulator.faults import Fault, Plan, plan_request

# Tagged timings kept at most; the oldest go first.
_MAX_TIMINGS = 200_000


class SimState:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.initial = dataclasses.replace(config)
        self.stats = SimulatorStats()
        self.queue: deque[Fault] = deque()
        self.rng = random.Random(config.seed)
        self.ids = itertools.count(1)
        self.closing = False
        # [[sim:tag=X]] -> (arrived, first token written), perf_counter seconds
        self.timings: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        for f in dataclasses.fields(self.config):
            setattr(self.config, f.name, getattr(self.initial, f.name))
        self.stats.reset()
        self.queue.clear()
        self.timings.clear()
        self.rng = random.Random(self.config.seed)

    def record_timing(self, tag: str, arrived: float) -> None:
        if len(self.timings) >= _MAX_TIMINGS:
            del self.timings[next(iter(self.timings))]  # the oldest
        self.timings[tag] = (arrived, time.perf_counter())

    def plan(self, directives: dict[str, str]) -> Plan:
        """How the next request is answered (see simulator.faults); faults are counted."""
        plan = plan_request(self.config, self.queue, self.rng, directives)
        if plan.fault is not None:
            self.stats.faults[plan.fault] += 1
        return plan


STATE = web.AppKey("swarmdesk_simulator_state", SimState)
