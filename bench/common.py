"""Shared helpers of the benchmark scenarios.

Common command-line options, child processes (`ManagedProcess`, readiness; a run's set of
them is `bench.processes.Workspace`), the simulator baseline, statistics (percentiles),
psutil sampling (CPU windows, RSS), a throw-away PostgreSQL database, service config
sections, and writing the JSON and PNG results and the summary tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
PERCENTILES = (50.0, 90.0, 99.0)

# --- command line -----------------------------------------------------------------------


def add_simulator_arguments(
    p: argparse.ArgumentParser, *, reply_tokens: int = 40, reply_help: str | None = None
) -> None:
    """The simulator's speed: --sim-first-token-ms, --sim-tps, --reply-tokens."""
    p.add_argument("--sim-first-token-ms", type=float, default=300.0)
    p.add_argument("--sim-tps", type=float, default=50.0, help="simulator tokens per second")
    p.add_argument("--reply-tokens", type=int, default=reply_tokens, help=reply_help)


def simulator_options(args: argparse.Namespace) -> list[str]:
    """The simulator's command-line options for `add_simulator_arguments`' arguments."""
    return [
        *("--first-token-ms", str(args.sim_first_token_ms), "--tps", str(args.sim_tps)),
        *("--reply-tokens", str(args.reply_tokens)),
    ]


def add_db_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--pg-admin-dsn",
        default=os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="where to CREATE/DROP the throw-away database for --db postgres",
    )


def add_output_arguments(p: argparse.ArgumentParser, *, profile: bool = False) -> None:
    """--out and --tag; with `profile`, --profile (for scenarios that can run the service
    under cProfile)."""
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results directory")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    if profile:
        p.add_argument(
            "--profile",
            action="store_true",
            help="run the service under cProfile (slower!) and write <name>.service.prof/.txt",
        )


def add_workspace_arguments(
    p: argparse.ArgumentParser, *, wait_quiet: float | None = 0.0, tmp_dir: bool = False
) -> None:
    """--keep-tmp; --wait-quiet S (default `wait_quiet`, none when None); with `tmp_dir`,
    --tmp-dir (where the temp dir with the SQLite file goes)."""
    if tmp_dir:
        p.add_argument(
            "--tmp-dir",
            type=Path,
            default=None,
            help="where the temp dir (config, SQLite file, logs) goes, e.g. /dev/shm to take "
            "the disk out of the picture (default: the system's temp dir)",
        )
    if wait_quiet is not None:
        p.add_argument(
            "--wait-quiet",
            type=float,
            default=wait_quiet,
            metavar="S",
            help="before the load, wait up to S seconds until other processes on the machine "
            "use less than a quarter of a core (they are measured and reported either way)",
        )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, DB, logs)")


# --- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    rank = (len(s) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def summarize(values: Sequence[float], digits: int = 2) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of `values` (None when there are none)."""
    out: dict[str, float | int | None] = {"count": len(values)}
    if not values:
        out.update(dict.fromkeys(("mean", "p50", "p90", "p99", "max")))
        return out
    s = sorted(values)
    out["mean"] = round(sum(s) / len(s), digits)
    for p in PERCENTILES:
        out[f"p{p:g}"] = round(percentile(s, p), digits)
    out["max"] = round(s[-1], digits)
    return out


def fmt_ms(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def overhead_ms(
    measured: Mapping[str, Any], baseline: Mapping[str, Any]
) -> dict[str, float | None]:
    """p50 and p99 of two `summarize` results, `measured` minus `baseline`."""
    out: dict[str, float | None] = {}
    for p in ("p50", "p99"):
        a, b = measured.get(p), baseline.get(p)
        out[p] = round(float(a) - float(b), 2) if a is not None and b is not None else None
    return out


# --- processes --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def http_client(sock_read_s: float | None = None) -> aiohttp.ClientSession:
    """A client without a connection limit (the load opens many at once).

    With `sock_read_s`: no total timeout (streams last as long as the run), only this one
    per read; without it, aiohttp's defaults.
    """
    connector = aiohttp.TCPConnector(limit=0)
    if sock_read_s is None:
        return aiohttp.ClientSession(connector=connector)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=sock_read_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


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


# --- service config ---------------------------------------------------------------------


def base_service_config(port: int, db_url: str) -> dict[str, Any]:
    """The sections every scenario's service has: its port, its database, a JSON log of
    warnings and errors (scanned after the run)."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 5},
        "database": {"url": db_url},
        "log": {"format": "json", "level": "warning"},
    }


def simulator_provider(
    sim_port: int, models: Sequence[Mapping[str, Any]], **options: Any
) -> dict[str, Any]:
    """A `providers[]` entry named `sim` for the simulator listening on `sim_port`."""
    return {
        "name": "sim",
        "base_url": f"http://127.0.0.1:{sim_port}/v1",
        **options,
        "models": [dict(m) for m in models],
    }


FALLBACK_TEXT = "Sorry, I can't answer that right now. A colleague will get back to you shortly."


def one_specialist_sections(
    sim_port: int,
    *,
    max_concurrency: int,
    turn_deadline_s: float,
    specialist_timeout_s: float,
    **reply: Any,
) -> dict[str, Any]:
    """One model (`sim-chat`) for both tiers, one specialist for every message and no LLM
    routing: one model call per answer, so the answer's time is the model's plus the
    channel's. `reply` adds to the `reply` section."""
    provider = simulator_provider(
        sim_port,
        [{"name": "sim-chat", "input_price_per_mtok": 0.27}],
        first_token_timeout_seconds=20,
        max_concurrency=max_concurrency,
    )
    return {
        "providers": [provider],
        "tiers": {"cheap": ["sim/sim-chat"], "premium": ["sim/sim-chat"]},
        "reply": {
            "fallback_text": FALLBACK_TEXT,
            "turn_deadline_seconds": turn_deadline_s,
            **reply,
        },
        "routing": {"llm_below": 0},
        "specialists": [
            {
                "name": "general",
                "intents": ["other"],
                "timeout_seconds": specialist_timeout_s,
                "system_prompt": "You are the shop's assistant. Answer briefly.",
            }
        ],
    }


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True), "utf-8")
    return path


# --- PostgreSQL -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def temporary_postgres_db(admin_dsn: str, name: str) -> AsyncIterator[str]:
    """Create database `name` through `admin_dsn` (trust auth) and drop it afterwards.

    Yields the SQLAlchemy URL of the new database (asyncpg driver).
    """
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_dsn)
    url = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))
    try:
        yield url
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- psutil sampling --------------------------------------------------------------------


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


# --- the simulator and the service over HTTP ---------------------------------------------


async def simulator_baseline(
    http: aiohttp.ClientSession,
    sim_base: str,
    count: int,
    rate: float,
    questions: Sequence[str],
    *,
    model: str = "sim-cheap",
    warmup: int = 5,
) -> tuple[list[float], int]:
    """Time to the first content delta of `count` direct streamed calls, paced at `rate`/s,
    after `warmup` unmeasured ones; prints p50 and p99.

    Returns (latencies in ms, failures).
    """
    await _simulator_first_tokens(http, sim_base, warmup, rate, questions, model)
    baseline, failures = await _simulator_first_tokens(
        http, sim_base, count, rate, questions, model
    )
    print(
        f"bench: simulator baseline first token p50 {percentile(baseline, 50):.1f} ms,"
        f" p99 {percentile(baseline, 99):.1f} ms (n={len(baseline)})"
    )
    return baseline, failures


async def _simulator_first_tokens(
    http: aiohttp.ClientSession,
    sim_base: str,
    count: int,
    rate: float,
    questions: Sequence[str],
    model: str,
) -> tuple[list[float], int]:
    failures = 0

    async def one(i: int) -> float | None:
        nonlocal failures
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are the customer-service assistant."},
                {"role": "user", "content": questions[i % len(questions)]},
            ],
        }
        started = time.perf_counter()
        first: float | None = None
        try:
            async with http.post(f"{sim_base}/chat/completions", json=body) as r:
                if r.status != 200:
                    failures += 1
                    return None
                buf = b""
                async for chunk in r.content.iter_any():
                    if first is not None:
                        continue  # read to the end, like the service does
                    now = time.perf_counter()
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data: {"):
                            continue
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            first = now
                            break
        except (aiohttp.ClientError, TimeoutError):
            failures += 1
            return None
        if first is None:
            failures += 1
            return None
        return (first - started) * 1000.0

    tasks: list[asyncio.Task[float | None]] = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    return [r for r in results if r is not None], failures


async def fetch_text(http: aiohttp.ClientSession, url: str) -> str | None:
    """The body of a GET, or None when it failed (metrics are nice to have, not essential)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with http.get(url) as r:
            return await r.text()
    return None


async def service_metrics(http: aiohttp.ClientSession, svc_url: str) -> dict[str, float]:
    text = await fetch_text(http, f"{svc_url}/metrics")
    return parse_prometheus(text) if text is not None else {}


async def simulator_stats(http: aiohttp.ClientSession, sim_url: str) -> dict[str, Any]:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{sim_url}/_sim/stats") as r:
            data = await r.json()
            return data if isinstance(data, dict) else {}
    return {}


async def simulator_timings(http: aiohttp.ClientSession, sim_url: str) -> dict[str, Any]:
    """The `[[sim:tag=X]]` timings the simulator recorded since they were last read."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{sim_url}/_sim/timings") as r:
            if r.status == 200:
                data = await r.json()
                return data if isinstance(data, dict) else {}
    return {}


# --- service logs and metrics -----------------------------------------------------------


def scan_json_log(path: Path, excerpt_lines: int = 12) -> dict[str, Any]:
    """Counts of the service's JSON log lines by level and event, and the first warnings+."""
    counts: Counter[str] = Counter()
    excerpt: list[str] = []
    other = 0
    try:
        lines = path.read_text("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            other += 1
            if len(excerpt) < excerpt_lines:
                excerpt.append(line[:500])
            continue
        if not isinstance(rec, dict):
            other += 1
            continue
        level = str(rec.get("level", "?"))
        counts[f"{level}:{rec.get('event', '?')}"] += 1
        if level in ("warning", "error", "critical") and len(excerpt) < excerpt_lines:
            excerpt.append(line[:500])
    return {"counts": dict(counts.most_common()), "non_json_lines": other, "excerpt": excerpt}


def parse_prometheus(text: str, prefix: str = "swarmdesk_") -> dict[str, float]:
    """Samples of metrics starting with `prefix` ('name{labels}' -> value); buckets dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix) or "_bucket{" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """after - before for every sample of `after` (gauges are given as they are after)."""
    out: dict[str, float] = {}
    for name, value in after.items():
        base = name.split("{", 1)[0]
        if base.endswith(("_total", "_sum", "_count")):
            out[name] = round(value - before.get(name, 0.0), 6)
        else:
            out[name] = value
    return out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: mappings recursively, everything else replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


SERVICE_DIRS = ("bot", "channels", "orchestration", "storage", "migrations")


def export_ref(ref: str, dest: Path) -> Path:
    """`git archive` of `ref` unpacked into `dest` (to run a commit, not the working tree)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, *SERVICE_DIRS],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"bench: git archive {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _git(*argv: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_fingerprint(root: Path = REPO_ROOT, ref: str | None = None) -> dict[str, Any]:
    """Which service code was measured: the commit, uncommitted changes, a hash of the sources."""
    digest = hashlib.sha256()
    for d in SERVICE_DIRS:
        for f in sorted((root / d).rglob("*")):
            if (
                f.is_file()
                and f.suffix in (".py", ".yaml", ".json")
                and "__pycache__" not in f.parts
            ):
                digest.update(str(f.relative_to(root)).encode())
                digest.update(f.read_bytes())
    info: dict[str, Any] = {
        "source": f"git {ref}" if ref else "working tree",
        "commit": _git("rev-parse", "--short", ref or "HEAD"),
        "sources_sha256": digest.hexdigest()[:16],
    }
    if ref is None:
        status = _git("status", "--porcelain", "--", *SERVICE_DIRS)
        info["uncommitted_files"] = len(status.splitlines()) if status is not None else None
    return info


# --- output -----------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "cpu_count": os.cpu_count(),
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _clean(obj: Any) -> Any:
    """JSON-safe: nan/inf become null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write atomically (through `<path>.tmp`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(dict(data)), indent=2, ensure_ascii=False) + "\n", "utf-8")
    tmp.replace(path)
    return path


def profile_report(prof: Path, stem: Path, top: int = 40) -> list[Path]:
    """Copy a cProfile dump to `<stem>.prof` and write the top functions to `<stem>.txt`."""
    import io
    import pstats

    out_prof = stem.with_name(stem.name + ".prof")
    out_txt = stem.with_name(stem.name + ".txt")
    shutil.copyfile(prof, out_prof)
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf).strip_dirs()
    for key in ("tottime", "cumulative"):
        buf.write(f"==== by {key} ====\n")
        stats.sort_stats(key).print_stats(top)
    out_txt.write_text(buf.getvalue(), "utf-8")
    return [out_prof, out_txt]


def save_results(
    out: Path,
    stem: str,
    result: Mapping[str, Any],
    plot: Callable[[Path], None],
    *,
    service_log: Path | None = None,
    profile: Path | None = None,
) -> list[Path]:
    """`<stem>.json` and the `<stem>.png` that `plot` draws in `out`; with `service_log`, a
    copy of it when the service logged warnings (or anything not JSON); with `profile`, the
    cProfile report if the service wrote one. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [write_json(out / f"{stem}.json", result)]
    png = out / f"{stem}.png"
    plot(png)
    files.append(png)
    log = result.get("service_log") or {}
    if service_log is not None and (log.get("counts") or log.get("non_json_lines")):
        files.append(out / f"{stem}.service.log")
        shutil.copyfile(service_log, files[-1])
    if profile is not None and profile.exists():
        files += profile_report(profile, out / f"{stem}.service")
    return files


def latency_header(title: str, width: int) -> str:
    return f"  {title:<{width}}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'n':>8}"


def latency_row(label: str, s: Mapping[str, Any], width: int) -> str:
    """One row of a `latency_header` table from a `summarize` result."""
    cells = "".join(f"{fmt_ms(s.get(k)):>9}" for k in ("p50", "p90", "p99", "max"))
    return f"  {label:<{width}}{cells}{s.get('count', 0):>8}"


def summary_tail(r: Mapping[str, Any], files: Sequence[Path]) -> list[str]:
    """The last lines of every summary: notes, problems, warnings, the files written."""
    lines = [f"  note: {note}" for note in r.get("notes", [])[:5]]
    if r["problems"]:
        lines.append("PROBLEMS: " + "; ".join(r["problems"]))
    lines += [f"WARNING: {warning}" for warning in r.get("warnings", [])]
    lines.append("results: " + ", ".join(str(f) for f in files))
    return lines


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percentile_curve(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """(percentiles, values) points for a latency-by-percentile plot, denser at the tail."""
    if not values:
        return [], []
    s = sorted(values)
    ps = [float(p) for p in range(0, 90)] + [90 + i * 0.1 for i in range(0, 100)] + [100.0]
    return ps, [percentile(s, p) for p in ps]


def plot_percentiles(
    ax: Any, series: Mapping[str, Sequence[float]], ylabel: str, *, tail: float = 0.1
) -> None:
    """Latency by percentile: x is the share of values slower than y, on a log scale down to
    `tail` percent, so the tail stretches out to the right."""
    for label, values in series.items():
        ps, vs = percentile_curve(values)
        if ps:
            ax.plot([100 - x for x in ps[:-1]], vs[:-1], label=f"{label} (n={len(values)})")
    ax.set_xscale("log")
    ax.set_xlim(100, tail)
    ticks = [t for t in (100, 50, 10, 1, 0.1, 0.01) if t >= tail]
    ax.set_xticks(ticks, [f"p{100 - t:g}" for t in ticks])
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
