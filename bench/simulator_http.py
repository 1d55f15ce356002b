"""The model simulator over HTTP: the direct first-token baseline, its stats and the
timings of tagged calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from bench.stats import percentile


async def simulator_baseline(
    http: aiohttp.ClientSession,
    sim_base: str,
    count: int,
    rate: float,
    questions: Sequence[str],
    *,
    model: str = "sim-cheap",
    warmup: int = 5,
) -> tuple[list[float], int]:
    """Time to the first content delta of `count` direct streamed calls, paced at `rate`/s,
    after `warmup` unmeasured ones; prints p50 and p99.

    Returns (latencies in ms, failures).
    """
    await _simulator_first_tokens(http, sim_base, warmup, rate, questions, model)
    baseline, failures = await _simulator_first_tokens(
        http, sim_base, count, rate, questions, model
    )
    print(
        f"bench: simulator baseline first token p50 {percentile(baseline, 50):.1f} ms,"
        f" p99 {percentile(baseline, 99):.1f} ms (n={len(baseline)})"
    )
    return baseline, failures


async def _simulator_first_tokens(
    http: aiohttp.ClientSession,
    sim_base: str,
    count: int,
    rate: float,
    questions: Sequence[str],
    model: str,
) -> tuple[list[float], int]:
    failures = 0

    async def one(i: int) -> float | None:
        nonlocal failures
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are the customer-service assistant."},
                {"role": "user", "content": questions[i % len(questions)]},
            ],
        }
        started = time.perf_counter()
        first: float | None = None
        try:
            async with http.post(f"{sim_base}/chat/completions", json=body) as r:
                if r.status != 200:
                    failures += 1
                    return None
                buf = b""
                async for chunk in r.content.iter_any():
                    if first is not None:
                        continue  # read to the end, like the service does
                    now = time.perf_counter()
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data: {"):
                            continue
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            first = now
                            break
        except (aiohttp.ClientError, TimeoutError):
            failures += 1
            return None
        if first is None:
            failures += 1
            return None
        return (first - started) * 1000.0

    tasks: list[asyncio.Task[float | None]] = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    return [r for r in results if r is not None], failures


async def simulator_stats(http: aiohttp.ClientSession, sim_url: str) -> dict[str, Any]:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{sim_url}/_sim/stats") as r:
            data = await r.json()
            return data if isinstance(data, dict) else {}
    return {}


async def simulator_timings(http: aiohttp.ClientSession, sim_url: str) -> dict[str, Any]:
    """The `[[sim:tag=X]]` timings the simulator recorded since they were last read."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with http.get(f"{sim_url}/_sim/timings") as r:
            if r.status == 200:
                data = await r.json()
                return data if isinstance(data, dict) else {}
    return {}
