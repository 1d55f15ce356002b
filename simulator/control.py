"""The `/_sim` endpoints: steer a running simulator over HTTP (tests, benchmarks).

- `POST /_sim/faults` queues faults for the next requests; `POST /_sim/config` changes the
  configuration live; `POST /_sim/reset` goes back to the start;
- `GET /_sim/stats` counts requests, tokens and faults; `GET /_sim/timings` says when each
  `[[sim:tag=X]]` request came in and when its first token went out, so a benchmark can take
  the simulator's own delays out of what it charges to the service.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

from aiohttp import web

from simulator.config import FAULTS, SimulatorConfig, config_value, optional_number
from simulator.faults import Fault
from simulator.responses import openai_error
from simulator.state import STATE


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return openai_error(400, "invalid JSON", "invalid_request_error")
    if not isinstance(body, dict):
        return openai_error(400, "expected a JSON object", "invalid_request_error")
    return body


async def queue_faults(request: web.Request) -> web.Response:
    """Queue `count` faults of one kind for the next requests, FIFO."""
    state = request.app[STATE]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    kind = str(body.get("fault", ""))
    if kind not in FAULTS:
        return openai_error(
            400, f"'fault' must be one of {', '.join(FAULTS)}", "invalid_request_error"
        )
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 100_000:
        return openai_error(
            400, "'count' must be an integer from 0 to 100000", "invalid_request_error"
        )
    try:
        retry_after = optional_number(body.get("retry_after"))
        first_token_ms = optional_number(body.get("first_token_ms"))
    except ValueError as exc:
        return openai_error(400, str(exc), "invalid_request_error")
    fault = Fault(kind, retry_after=retry_after, first_token_ms=first_token_ms)
    state.queue.extend(itertools.repeat(fault, count))
    return web.json_response({"queued": len(state.queue)})


async def update_config(request: web.Request) -> web.Response:
    """Change SimulatorConfig fields at runtime; unknown fields or bad values are a 400."""
    state = request.app[STATE]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    updates: dict[str, Any] = {}
    for key, value in body.items():
        if key not in names:
            return openai_error(400, f"unknown config field {key!r}", "invalid_request_error")
        try:
            updates[key] = config_value(key, value)
        except ValueError as exc:
            return openai_error(400, f"{key}: {exc}", "invalid_request_error")
    for key, value in updates.items():
        setattr(state.config, key, value)
    if "seed" in updates:
        state.rng = random.Random(state.config.seed)
    return web.json_response(dataclasses.asdict(state.config))


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = state.stats.as_dict()
    data["queued"] = [f.kind for f in state.queue]
    return web.json_response(data)


async def get_timings(request: web.Request) -> web.Response:
    """{tag: [arrived, first token written]} of `[[sim:tag=X]]` requests (perf_counter
    seconds, comparable across processes on one machine), cleared by reading them."""
    state = request.app[STATE]
    data, state.timings = state.timings, {}
    return web.json_response(data)


async def reset(request: web.Request) -> web.Response:
    """Back to the configuration the simulator started with; stats and queue cleared."""
    request.app[STATE].reset()
    return web.json_response({"status": "reset"})
