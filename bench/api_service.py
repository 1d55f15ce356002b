"""The service the HTTP-API scenarios run: its generated config (the simulator's models,
one specialist or the service's own) and the texts it answers with when no model could."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.service_config import base_service_config, deep_merge, simulator_provider, write_yaml

API_KEY = "benchkey"
# --orchestration single: one specialist for every message, no LLM routing, so an answer is
# exactly one model call and first-delta latency minus the model's is the service's overhead.
SINGLE_ORCHESTRATION: dict[str, Any] = {
    "routing": {"llm_below": 0},
    "specialists": [
        {
            "name": "general",
            "intents": ["other"],
            "system_prompt": "You are the shop's customer-service assistant. Answer briefly.",
        }
    ],
}
# The simulator provider's models, one per tier the default specialists use.
SIM_MODELS = {"cheap": ("sim-cheap", 0.27, 1.10), "premium": ("sim-premium", 1.10, 4.40)}


def service_config(
    path: Path,
    *,
    port: int,
    db_url: str,
    sim_port: int,
    max_concurrency: int | None,
    orchestration: str,
    overrides: Path | None,
) -> None:
    models = [
        {"name": name, "input_price_per_mtok": pin, "output_price_per_mtok": pout}
        for name, pin, pout in SIM_MODELS.values()
    ]
    options = {} if max_concurrency is None else {"max_concurrency": max_concurrency}
    config: dict[str, Any] = {
        **base_service_config(port, db_url),
        "providers": [simulator_provider(sim_port, models, **options)],
        "tiers": {tier: [f"sim/{m[0]}"] for tier, m in SIM_MODELS.items()},
        "worker": {"max_concurrent_conversations": 1024},
    }
    if orchestration == "single":
        config.update(SINGLE_ORCHESTRATION)
    if overrides is not None:
        extra = yaml.safe_load(overrides.read_text("utf-8")) or {}
        if not isinstance(extra, dict):
            raise SystemExit(f"bench: {overrides}: expected a mapping of config sections")
        config = deep_merge(config, extra)
    write_yaml(path, config)


_DEGRADED_TEXTS_SCRIPT = """
import json, sys
from bot.settings import load_settings
s = load_settings(sys.argv[1])
texts = [getattr(s.reply, "fallback_text", None), getattr(s.reply, "fallback_text_zh", None)]
texts += [getattr(sp, "degraded_text", None) for sp in getattr(s, "specialists", [])]
print(json.dumps([t for t in texts if isinstance(t, str) and t]))
"""


def degraded_texts(config: Path, env: dict[str, str] | None) -> frozenset[str]:
    """The texts the service answers with when no model could (read by the service's code)."""
    done = subprocess.run(
        [sys.executable, "-c", _DEGRADED_TEXTS_SCRIPT, str(config)],
        env=env,
        cwd=config.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        texts = json.loads(done.stdout)
    except ValueError:
        print(
            "bench: could not read the fallback texts from the service settings; degraded "
            f"answers are counted from the service's metrics only ({done.stderr.strip()[-300:]})"
        )
        return frozenset()
    return frozenset(str(t) for t in texts)
