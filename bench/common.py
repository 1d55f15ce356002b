"""Shared helpers of the benchmark scenarios.

Process management (start the simulator and the service on free ports, wait until they are
ready, always stop them), statistics (percentiles), psutil sampling, a throw-away PostgreSQL
database, and writing the JSON and PNG results.
"""

from __future__ import annotations

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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
PERCENTILES = (50.0, 90.0, 99.0)

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


# --- processes --------------------------------------------------------------------------


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
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

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

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
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
