"""`python -m bench fuzz --cases N`: the long fuzzing profile (bench/fuzzing.py) over every
entry point, N cases in total; writes `fuzz-<N>.json` with the cases per entry point by
answer class and any failure Hypothesis found (shrunk, with its reproduce blob)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fuzzing import fuzzed_service, run_target, targets
from bench.options import add_output_arguments
from bench.result_files import environment, now_iso, write_json
from bot import logging as logs

NAME = "fuzz"
HELP = "Hypothesis over every entry point: never a 5xx, nothing stored when refused"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=100_000, help="cases in total")
    p.add_argument("--only", default="", help="comma-separated entry points (default: all of them)")
    add_output_arguments(p)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    chosen = [t for t in targets() if not args.only or t.name in args.only.split(",")]
    per_target = max(1, args.cases // len(chosen))
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    # The service's own log would drown the summary: errors only, aiohttp's parser quiet.
    logs.configure("console", "critical")
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="swarmdesk-fuzz-") as tmp:
        with fuzzed_service(Path(tmp)) as svc:
            for target in chosen:
                started = time.monotonic()
                try:
                    run_target(svc, target, per_target)
                except Exception as e:  # one entry point's failure must not hide the others
                    failures[target.name] = f"{type(e).__name__}: {e}"[-4000:]
                seconds[target.name] = round(time.monotonic() - started, 1)
                counts = dict(svc.tally.counts.get(target.name, {}))
                status = "FAILED" if target.name in failures else "ok"
                print(f"{target.name:15} {status:6} {seconds[target.name]:7.1f} s  {counts}")
            counts_all = {k: dict(v) for k, v in svc.tally.counts.items()}
            total = svc.tally.total()
    return {
        "scenario": NAME,
        "finished_at": now_iso(),
        "environment": environment(),
        "cases_asked": args.cases,
        "cases_per_entry_point": per_target,
        "cases_run": total,
        "by_entry_point": counts_all,
        "seconds": seconds,
        "failures": failures,
        "ok": not failures,
    }


async def run(args: argparse.Namespace) -> int:
    result = await asyncio.to_thread(_run, args)
    stem = f"fuzz-{args.cases}" + (f"-{args.tag}" if args.tag else "")
    path = write_json(args.out / f"{stem}.json", result)
    print(f"{result['cases_run']} cases, {len(result['failures'])} failing entry points -> {path}")
    for name, text in result["failures"].items():
        print(f"--- {name}\n{text}")
    return 0 if result["ok"] else 1
