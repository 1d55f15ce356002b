"""A benchmark run's child processes and its temp dir.

`ManagedProcess` is one child with its output in a log file, stopped however the run ends;
`wait_ready` polls it until it serves. `Workspace` makes the temp dir (generated config,
SQLite file, logs), the model simulator, the service and any fake API as child processes on
free ports, the run's database, and stops every process and removes the dir however the run
ends (Ctrl-C, SIGTERM, an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from bench.postgres import temporary_postgres_db
from bench.service_code import REPO_ROOT, export_ref, source_fingerprint
from bench.service_log import scan_json_log


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child if the benchmark itself dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without SWARMDESK_* settings (they would override the config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMDESK_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class ManagedProcess:
    """A child process with its output in a log file; `stop()` is safe to call repeatedly."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int | None = None,
        ready_path: str = "/healthz",
        stop_grace_s: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._port = port  # where it listens on 127.0.0.1, if it serves HTTP
        self.ready_path = ready_path  # answers 200 once it is ready
        self.stop_grace_s = stop_grace_s
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    @property
    def port(self) -> int:
        assert self._port is not None, f"{self.name} has no port"
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            # Own session: a Ctrl-C in the terminal reaches only the benchmark, which then
            # stops its children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, wait up to `grace_s` (default: `stop_grace_s`), then SIGKILL.

        Returns the exit code.
        """
        if self.popen is None:
            return None
        if grace_s is None:
            grace_s = self.stop_grace_s
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"bench: {self.name} did not stop in {grace_s:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return p.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StartupError(RuntimeError):
    pass


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    proc: ManagedProcess,
    timeout_s: float = 60.0,
) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = proc.exited()
        if code is not None:
            raise StartupError(
                f"{proc.name} exited with code {code} during start-up; log tail:\n"
                + proc.log_tail()
            )
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}: {(await r.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            last = repr(e)
        await asyncio.sleep(0.1)
    raise StartupError(
        f"{proc.name} not ready at {url} after {timeout_s:.0f} s ({last}); log tail:\n"
        + proc.log_tail()
    )


async def wait_all_ready(session: aiohttp.ClientSession, *procs: ManagedProcess) -> None:
    """`wait_ready` for each process at its own ready URL, in turn."""
    for proc in procs:
        await wait_ready(session, proc.url + proc.ready_path, proc)


# The service gets longer than the others to finish its turns and close its database.
SERVICE_STOP_GRACE_S = 15.0


class Workspace:
    """The temp dir of one run and the child processes made in it.

    Leaving the `with` block stops every process, the last made first (the service before
    the simulator and fakes it calls), then removes the temp dir unless `keep`.
    """

    def __init__(self, prefix: str, *, parent: Path | None = None, keep: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.keep = keep
        self.procs: list[ManagedProcess] = []
        self.ports: set[int] = set()
        self.ref: str | None = None
        self.src = REPO_ROOT  # the service code the processes run

    @property
    def config_path(self) -> Path:
        return self.tmp / "bench.yaml"

    @property
    def profile_path(self) -> Path:
        return self.tmp / "service.prof"

    @property
    def sqlite_path(self) -> Path:
        return self.tmp / "bench.db"

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            if self.keep:
                print(f"bench: kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def free_port(self) -> int:
        """A free port that no other process of this run got."""
        port = free_port()
        while port in self.ports:
            port = free_port()
        self.ports.add(port)
        return port

    def process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str],
        cwd: Path | None = None,
        ready_path: str = "/healthz",
        stop_grace_s: float = 10.0,
    ) -> ManagedProcess:
        """A child process logging to `<name>.log` in the temp dir (not started yet)."""
        proc = ManagedProcess(
            name,
            argv,
            self.tmp / f"{name}.log",
            env=env,
            cwd=cwd or self.tmp,
            port=port,
            ready_path=ready_path,
            stop_grace_s=stop_grace_s,
        )
        self.procs.append(proc)
        return proc

    def simulator(self, options: Sequence[str] = ()) -> ManagedProcess:
        """The model simulator on a free port; `options` go to its command line."""
        port = self.free_port()
        return self.process(
            "simulator",
            [sys.executable, "-m", "simulator", "--port", str(port), *options],
            port=port,
            env=clean_env(),
        )

    def service(
        self, *, env: Mapping[str, str] | None = None, profile: bool = False
    ) -> ManagedProcess:
        """`swarmdesk serve` with `config_path` on a free port (under cProfile with
        `profile`, writing `profile_path`); `env` adds to its environment."""
        port = self.free_port()
        return self.process(
            "service",
            [
                sys.executable,
                *(("-m", "cProfile", "-o", str(self.profile_path)) if profile else ()),
                *("-m", "bot.cli", "--config", str(self.config_path)),
                *("serve", "--port", str(port)),
            ],
            port=port,
            env=clean_env(env),
            ready_path="/readyz",
            stop_grace_s=SERVICE_STOP_GRACE_S,
        )

    def floor_relay(self, sim: ManagedProcess) -> ManagedProcess:
        """bench/floor_relay.py (the HTTP API's wire protocol and nothing else) in place of
        the service, relaying to `sim`."""
        port = self.free_port()
        return self.process(
            "service",
            [
                *(sys.executable, "-m", "bench.floor_relay", "--port", str(port)),
                *("--model-url", f"{sim.url}/v1/chat/completions"),
            ],
            port=port,
            env=clean_env(),
            cwd=REPO_ROOT,
            ready_path="/readyz",
        )

    def use_ref(self, ref: str | None) -> Path:
        """With a git `ref`: the processes made so far run its service code, exported into
        the temp dir, instead of the working tree's. Returns the code's root."""
        if ref:
            self.ref = ref
            self.src = export_ref(ref, self.tmp / "src")
            for proc in self.procs:
                assert proc.env is not None
                proc.env["PYTHONPATH"] = str(self.src)
        return self.src

    @contextlib.asynccontextmanager
    async def database(
        self, kind: str, admin_dsn: str, name_prefix: str = "swarmdesk_bench"
    ) -> AsyncIterator[str]:
        """The run's database URL: a SQLite file in the temp dir, or (`kind` postgres) a
        throw-away PostgreSQL database made through `admin_dsn`.

        On leaving, the processes stop first (service first), then the PostgreSQL database
        is dropped: the service must not lose its database while it runs.
        """
        async with contextlib.AsyncExitStack() as stack:
            if kind == "postgres":
                name = f"{name_prefix}_{os.getpid()}_{secrets.token_hex(3)}"
                url = await stack.enter_async_context(temporary_postgres_db(admin_dsn, name))
            else:
                url = f"sqlite+aiosqlite:///{self.sqlite_path}"
            stack.callback(self.stop)
            yield url

    def stop(self) -> None:
        """Stop every process, the last made first; safe to call again."""
        for proc in reversed(self.procs):
            proc.stop()

    def service_outcome(self, svc: ManagedProcess) -> dict[str, Any]:
        """After the service stopped: its log's warnings and errors, its exit code and which
        code it ran."""
        return {
            "service_log": scan_json_log(svc.log_path),
            "service_exit_code": svc.popen.returncode if svc.popen else None,
            "service_code": source_fingerprint(self.src, ref=self.ref),
        }
