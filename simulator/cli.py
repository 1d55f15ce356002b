"""The simulator's command line, one definition for `swarmdesk simulator` and
`python -m simulator`: serve the OpenAI-compatible model simulator on its own (load tests,
demos); point a provider's `base_url` at the URL it prints."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from simulator.config import SimulatorConfig

DEFAULT_PORT = 8090

# (option, type, the SimulatorConfig field it sets (its default is the option's), help)
_OPTIONS: tuple[tuple[str, type, str, str | None], ...] = (
    ("--first-token-ms", float, "first_token_ms", None),
    ("--tps", float, "tokens_per_second", "tokens per second"),
    ("--reply-tokens", int, "reply_tokens", None),
    ("--fail-rate", float, "fail_rate", "share of 500 answers"),
    ("--rate-limit-rate", float, "rate_limit_rate", "share of 429 answers"),
    ("--hang-rate", float, "hang_rate", "share of calls that hang"),
    ("--cut-rate", float, "cut_rate", "share of streams cut mid-way"),
    ("--retry-after", float, "retry_after_s", "seconds a 429 asks to wait"),
    ("--seed", int, "seed", "seed of the random faults"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options, on `parser` (a parser of its own or a subcommand's)."""
    defaults = SimulatorConfig()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    for option, kind, name, help_text in _OPTIONS:
        parser.add_argument(option, type=kind, default=getattr(defaults, name), help=help_text)


def config_from(args: argparse.Namespace) -> SimulatorConfig:
    """The configuration the parsed options ask for."""
    return SimulatorConfig(
        **{name: getattr(args, option[2:].replace("-", "_")) for option, _, name, _ in _OPTIONS}
    )


def run(args: argparse.Namespace) -> None:
    """Serve with the parsed options until interrupted (blocking)."""
    from simulator.server import run_standalone  # aiohttp only when it is going to serve

    run_standalone(args.host, args.port, config_from(args))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="OpenAI-compatible fake model server for swarmdesk.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
