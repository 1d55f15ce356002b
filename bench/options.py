"""Command-line options more than one scenario has: the simulator's speed, the database,
where results go, the run's temp dir."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


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


def add_open_loop_arguments(p: argparse.ArgumentParser, *, sends: str = "messages") -> None:
    """--arrival, --seed, --baseline-requests and --warmup of a load that `sends` things at a
    rate, open loop, after a direct simulator baseline."""
    p.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline-requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help=f"unmeasured {sends} before the load")


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
