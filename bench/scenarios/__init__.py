"""Benchmark scenarios: each module has NAME, HELP, `add_arguments(parser)` and `async run(args)`.

Add a scenario by writing `bench/scenarios/<name>.py` and listing it in `SCENARIOS`.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Protocol


class Scenario(Protocol):
    NAME: str
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    async def run(self, args: argparse.Namespace) -> int: ...


SCENARIOS = ("api", "wechat", "wecom_kf", "telegram", "widget", "orchestration", "fuzz", "scale")


def load(name: str) -> Scenario:
    module = importlib.import_module(f"bench.scenarios.{name}")
    return module
