"""`python -m bench <scenario> [options]`: run one benchmark scenario (see bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from bench.processes import StartupError
from bench.scenarios import SCENARIOS, load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="swarmdesk benchmarks")
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name in SCENARIOS:
        scenario = load(name)
        sp = sub.add_parser(
            name,
            help=scenario.HELP,
            description=scenario.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        scenario.add_arguments(sp)
    return p


async def _stop_on_sigterm(coro: Coroutine[Any, Any, int]) -> int:
    """SIGTERM cancels the run like Ctrl-C does, so the scenario still stops its processes."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await coro
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    scenario = load(args.scenario)
    # Ctrl-C must stop the run cleanly even when SIGINT was inherited as ignored (a shell
    # starts background jobs that way): asyncio.run then cancels the scenario, which stops
    # its processes.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(_stop_on_sigterm(scenario.run(args)))
    except StartupError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; processes stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("bench: terminated; processes stopped", file=sys.stderr)
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
