"""Sections of the generated service config (`bench.yaml`) and writing it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def base_service_config(port: int, db_url: str) -> dict[str, Any]:
    """The sections every scenario's service has: its port, its database, a JSON log of
    warnings and errors (scanned after the run)."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 5},
        "database": {"url": db_url},
        "log": {"format": "json", "level": "warning"},
        # A simulator provider makes this a real deployment: keep the demo's parts on.
        "demo": {"allow": ["demo_shop", "demo_tools", "demo_site", "builtin_faq"]},
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


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: mappings recursively, everything else replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
