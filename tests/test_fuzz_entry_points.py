"""Hypothesis over every entry point (bench/fuzzing.py), the short profile: each case gets a
2xx or a JSON 4xx, never a 5xx or a broken socket; a refused case stores nothing; after each
entry point the service still answers. `python -m bench fuzz --cases N` runs the long one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fuzzing import FuzzedService, fuzzed_service, run_target, targets

CASES = 40  # per entry point: the whole file stays well under a minute

TARGETS = {t.name: t for t in targets()}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedService]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with fuzzed_service(tmp) as svc:
        yield svc


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_entry_point_survives_fuzzing(fuzzed: FuzzedService, name: str) -> None:
    run_target(fuzzed, TARGETS[name], CASES)
    assert sum(fuzzed.tally.counts[name].values()) >= CASES
