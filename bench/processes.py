"""A benchmark run's temp dir and child processes.

`Workspace` makes the temp dir (generated config, SQLite file, logs), the model simulator,
the service and any fake API as child processes on free ports, the run's database, and
stops every process and removes the dir however the run ends (Ctrl-C, SIGTERM, an error).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bench import common

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
        self.procs: list[common.ManagedProcess] = []
        self.ports: set[int] = set()
        self.ref: str | None = None
        self.src = common.REPO_ROOT  # the service code the processes run

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
        port = common.free_port()
        while port in self.ports:
            port = common.free_port()
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
    ) -> common.ManagedProcess:
        """A child process logging to `<name>.log` in the temp dir (not started yet)."""
        proc = common.ManagedProcess(
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

    def simulator(self, options: Sequence[str] = ()) -> common.ManagedProcess:
        """The model simulator on a free port; `options` go to its command line."""
        port = self.free_port()
        return self.process(
            "simulator",
            [sys.executable, "-m", "orchestration.llm.simulator", "--port", str(port), *options],
            port=port,
            env=common.clean_env(),
        )

    def service(
        self, *, env: Mapping[str, str] | None = None, profile: bool = False
    ) -> common.ManagedProcess:
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
            env=common.clean_env(env),
            ready_path="/readyz",
            stop_grace_s=SERVICE_STOP_GRACE_S,
        )

    def floor_relay(self, sim: common.ManagedProcess) -> common.ManagedProcess:
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
            env=common.clean_env(),
            cwd=common.REPO_ROOT,
            ready_path="/readyz",
        )

    def use_ref(self, ref: str | None) -> Path:
        """With a git `ref`: the processes made so far run its service code, exported into
        the temp dir, instead of the working tree's. Returns the code's root."""
        if ref:
            self.ref = ref
            self.src = common.export_ref(ref, self.tmp / "src")
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
                url = await stack.enter_async_context(common.temporary_postgres_db(admin_dsn, name))
            else:
                url = f"sqlite+aiosqlite:///{self.sqlite_path}"
            stack.callback(self.stop)
            yield url

    def stop(self) -> None:
        """Stop every process, the last made first; safe to call again."""
        for proc in reversed(self.procs):
            proc.stop()

    def service_outcome(self, svc: common.ManagedProcess) -> dict[str, Any]:
        """After the service stopped: its log's warnings and errors, its exit code and which
        code it ran."""
        return {
            "service_log": common.scan_json_log(svc.log_path),
            "service_exit_code": svc.popen.returncode if svc.popen else None,
            "service_code": common.source_fingerprint(self.src, ref=self.ref),
        }
