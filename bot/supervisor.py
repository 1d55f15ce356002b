"""`swarmdesk serve --workers N`: N serve processes on one machine sharing one port.

The parent holds no traffic. It runs the migrations once, reserves the port, starts the
children (each an ordinary `swarmdesk serve` that binds the port with SO_REUSEPORT, so the
kernel spreads new connections over them), passes SIGTERM/SIGINT on (each child drains as a
single process does), and restarts a child that dies, with backoff. Children that keep dying
right after their start make it give up with a non-zero exit: a loop of crashing processes
would look alive to an orchestrator and answer nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

# A child that lived shorter than this counts as "crashed at start" for the give-up rule.
STARTED_AFTER_S = 30.0
# Consecutive crashes at start of one slot before the whole group gives up.
MAX_START_CRASHES = 5
RESTART_BACKOFF_S = (0.5, 30.0)  # first delay, cap; doubles per consecutive crash
# A child exiting with this refused its configuration: every restart would do the same.
CONFIG_REFUSED = 2
# Beyond the children's own grace (they finish their answers), before SIGKILL.
STOP_SLACK_S = 15.0


class PortTaken(OSError):
    """The port is held by a process that does not share it."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on host:port and keep it.

    It turns port 0 into a real one every child then binds, and tells at once when another
    program holds the port. A socket that never listens receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortTaken(e.errno, f"{host}:{port}: {e.strerror}") from e
    return sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the parent dies, even by SIGKILL (no orphans
    holding the port)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    crashes: int = 0  # consecutive crashes at start
    restarts: int = 0


@dataclass
class Supervisor:
    """Runs `count` children made by `argv(slot)` until stopped; `run()` returns the exit
    status of the group."""

    count: int
    argv: Callable[[int], Sequence[str]]
    stop_grace_s: float
    started_after_s: float = STARTED_AFTER_S
    max_start_crashes: int = MAX_START_CRASHES
    backoff_s: tuple[float, float] = RESTART_BACKOFF_S
    _slots: list[_Slot] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _status: int = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        self._slots = [_Slot(i) for i in range(self.count)]
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in self._slots:
                    tg.create_task(self._keep(slot))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        log.info("workers_stopped", status=self._status)
        return self._status

    def stop(self, status: int = 0) -> None:
        """Stop every child (each drains), then return `status` from `run()`."""
        if self._stopping.is_set():
            return
        self._status = status
        self._stopping.set()
        log.info("workers_stopping", workers=self.count)
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)

    async def _keep(self, slot: _Slot) -> None:
        """Run the slot's child, and again whenever it dies, until the group stops."""
        while not self._stopping.is_set():
            started = time.monotonic()
            slot.proc = await asyncio.create_subprocess_exec(
                *self.argv(slot.index),
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            log.info("worker_started", worker=slot.index, pid=slot.proc.pid)
            if self._stopping.is_set():  # a stop arrived while it was being made
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
            code = await self._wait(slot.proc)
            if self._stopping.is_set():
                log.info("worker_stopped", worker=slot.index, pid=slot.proc.pid, code=code)
                return
            lived = time.monotonic() - started
            if code == CONFIG_REFUSED and lived < self.started_after_s:
                log.error("worker_refused_config", worker=slot.index, code=code)
                self.stop(CONFIG_REFUSED)
                return
            slot.crashes = slot.crashes + 1 if lived < self.started_after_s else 1
            if slot.crashes >= self.max_start_crashes:
                log.error(
                    "workers_giving_up",
                    worker=slot.index,
                    code=code,
                    crashes=slot.crashes,
                    detail="a worker keeps dying right after its start; see its log above",
                )
                self.stop(1)
                return
            first, cap = self.backoff_s
            delay = min(cap, first * 2 ** (slot.crashes - 1))
            slot.restarts += 1
            log.warning(
                "worker_died",
                worker=slot.index,
                pid=slot.proc.pid,
                code=code,
                lived_s=round(lived, 1),
                restart_in_s=delay,
                restarts=slot.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """The child's exit code; once the group stops, SIGKILL after the grace period."""
        waiting = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                try:
                    await asyncio.wait_for(
                        asyncio.shield(waiting), self.stop_grace_s + STOP_SLACK_S
                    )
                except TimeoutError:
                    log.warning("worker_killed", pid=proc.pid, detail="did not stop in time")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            return await waiting
        finally:
            stopping.cancel()
