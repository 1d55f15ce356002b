"""A run's results: the JSON (with when and where it ran), the PNG plot, the service's log
and profile; `publish` writes them and prints the summary."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil


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


def publish(
    out: Path,
    stem: str,
    result: dict[str, Any],
    plot: Callable[[Path], None],
    summary: Callable[[dict[str, Any], list[Path]], str],
    *,
    service_log: Path | None = None,
    profile: Path | None = None,
) -> int:
    """`save_results`, then print the `summary` of the result and the files written.

    Returns the run's exit status: 0 when the result is ok, 1 when it has problems.
    """
    files = save_results(out, stem, result, plot, service_log=service_log, profile=profile)
    print(summary(result, files))
    return 0 if result["ok"] else 1
