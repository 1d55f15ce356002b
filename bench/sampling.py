"""psutil sampling: CPU seconds of processes and of the whole machine, RSS over time,
waiting until other processes leave the machine quiet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from bench.processes import ManagedProcess


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of `proc` and its children so far."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait, since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


async def machine_other_load(ours: Sequence[psutil.Process], seconds: float = 2.0) -> float:
    """Cores kept busy by processes other than `ours` during the next `seconds`."""
    own0 = sum(cpu_seconds(p) for p in ours)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    own1 = sum(cpu_seconds(p) for p in ours)
    busy1, t1 = machine_busy_seconds(), time.monotonic()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


async def wait_quiet(
    ours: Sequence[psutil.Process], max_wait_s: float, threshold_cores: float = 0.25
) -> float:
    """Wait (up to `max_wait_s`) until other processes use less than `threshold_cores`.

    Returns the last measured load of the others (cores).
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        other = await machine_other_load(ours)
        if other < threshold_cores or time.monotonic() >= deadline:
            return other
        print(f"bench: other processes keep {other:.2f} cores busy; waiting for quiet")


def psutil_processes(named: Mapping[str, ManagedProcess | None]) -> dict[str, psutil.Process]:
    """psutil handles by name, in the given order; None stands for this process (the load
    generator)."""
    return {
        name: psutil.Process(os.getpid() if proc is None else proc.pid)
        for name, proc in named.items()
    }


class CpuWindow:
    """CPU seconds of some processes and of the whole machine from creation to `stop()`."""

    def __init__(self, procs: Mapping[str, psutil.Process]) -> None:
        self.procs = procs
        self._cpu0 = {n: cpu_seconds(p) for n, p in procs.items()}
        self._busy0 = machine_busy_seconds()
        self.cpu: dict[str, float] = {}  # by name, set by stop()
        self.machine_busy_s = 0.0

    def stop(self) -> dict[str, float]:
        self.cpu = {n: cpu_seconds(p) - self._cpu0[n] for n, p in self.procs.items()}
        self.machine_busy_s = machine_busy_seconds() - self._busy0
        return self.cpu

    @property
    def others_s(self) -> float:
        """CPU seconds of every other process on the machine (other people's tests, ...)."""
        return max(0.0, self.machine_busy_s - sum(self.cpu.values()))


@dataclass
class RssSampler:
    """Samples the resident set size of some processes every `interval_s` seconds."""

    procs: Mapping[str, psutil.Process]
    interval_s: float = 0.2
    peak_bytes: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = time.perf_counter()
        row: dict[str, int] = {}
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                rss = int(p.memory_info().rss)
                row[name] = rss
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), rss)
        self.samples.append((now, row))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rss-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sample()

    def peak_mb(self, name: str) -> float:
        return round(self.peak_bytes.get(name, 0) / 2**20, 1)
