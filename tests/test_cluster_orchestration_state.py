"""Model guards, budgets and sign-in limits hold across processes (issue 13, queue.backend:
redis). Two instances of each part on one key prefix stand for two processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.console.auth import FAILURES_PER_EMAIL, SharedSignInLimits, SignInLimits
from cluster.outage import RedisUnavailable
from cluster.redis import RedisParts
from orchestration.budgets import Budgets, BudgetState, SharedBudgets
from orchestration.config import BudgetSettings, ResilienceSettings
from orchestration.llm.client import ProviderClient
from orchestration.llm.registry import ModelEntry, ModelRegistry
from orchestration.llm.types import ChatMessage, ModelPrice
from orchestration.resilience import BreakerState, Guards, ModelGuard
from orchestration.runner import CallSpec, ModelRunner
from simulator.server import Simulator
from tests.redis_support import REDIS_URL, PrivateRedis, private_redis

MODEL = "sim/m"
IP = "203.0.113.7"


@pytest.fixture
async def two_processes(redis_prefix: str) -> AsyncIterator[tuple[RedisParts, RedisParts]]:
    a = RedisParts.connect(REDIS_URL, REDIS_URL, REDIS_URL, redis_prefix)
    b = RedisParts.connect(REDIS_URL, REDIS_URL, REDIS_URL, redis_prefix)
    yield a, b
    await a.aclose()
    await b.aclose()


async def until(check: Callable[[], Awaitable[bool]], tries: int = 100) -> None:
    """Polls `check` (a part back after a Redis outage retries after a moment)."""
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never became true")


def guards(parts: RedisParts | None, **resilience: Any) -> Guards:
    return Guards(ResilienceSettings(**resilience), shared=parts)


# -- breakers, cool-downs, rate limits --------------------------------------------------------


async def test_a_breaker_opened_by_one_process_is_open_in_the_other(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p, breaker_failures=2) for p in two_processes)
    a, b = ga.get(MODEL), gb.get(MODEL)
    assert await b.admit(100, 0)
    b.breaker.record(ok=True)
    a.breaker.record(ok=False)
    a.breaker.record(ok=False)
    await ga.aclose()  # what A told Redis has arrived
    assert a.breaker.state is BreakerState.OPEN
    assert not await b.admit(100, 0)
    # B now knows without asking again, and when to come back.
    assert not b.available()
    assert b.ready_at() > time.monotonic() + 20


async def test_one_probe_for_all_processes_and_its_success_closes_the_breaker_for_all(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p, breaker_failures=1, breaker_cooldown_seconds=0.2) for p in two_processes)
    a, b = ga.get(MODEL), gb.get(MODEL)
    a.breaker.record(ok=False)
    await ga.aclose()
    assert not await b.admit(100, 0)
    await asyncio.sleep(0.3)  # the cooldown passes
    assert await b.admit(100, 0)  # B probes...
    assert not await a.admit(100, 0)  # ...and A, though it opened it, does not
    assert not await b.admit(100, 0)  # nor another turn of B
    b.breaker.record(ok=True)
    await gb.aclose()
    assert await a.admit(100, 0)
    assert a.breaker.state is BreakerState.CLOSED


async def test_a_failed_probe_opens_the_breaker_again_for_all(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p, breaker_failures=1, breaker_cooldown_seconds=0.2) for p in two_processes)
    a, b = ga.get(MODEL), gb.get(MODEL)
    a.breaker.record(ok=False)
    await ga.aclose()
    await asyncio.sleep(0.3)
    assert await b.admit(100, 0)
    b.breaker.record(ok=False)
    await gb.aclose()
    assert not await a.admit(100, 0)
    assert not await b.admit(100, 0)


async def test_a_probe_that_never_reports_back_is_replaced_after_its_lease(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p, breaker_failures=1, breaker_cooldown_seconds=0.2) for p in two_processes)
    a, b = ga.get(MODEL), gb.get(MODEL)
    a.breaker.record(ok=False)
    await ga.aclose()
    await asyncio.sleep(0.3)
    assert await b.admit(100, 0)  # B's probe is then cancelled: no verdict ever comes
    assert not await a.admit(100, 0)
    await asyncio.sleep(0.3)  # the probe's lease (one cooldown) runs out
    assert await a.admit(100, 0)  # A probes now
    assert not await b.admit(100, 0)  # and B, no longer stuck on its own probe, waits for it
    a.breaker.record(ok=True)
    await ga.aclose()
    assert await b.admit(100, 0)


async def test_a_429_in_one_process_holds_the_model_off_in_the_other(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p) for p in two_processes)
    a, b = ga.get(MODEL), gb.get(MODEL)
    a.cool(30)
    await ga.aclose()
    assert not await b.admit(100, 5)
    assert not b.available()
    assert b.ready_at() > time.monotonic() + 20
    # The breaker is not involved: a 429 is the provider's limit, not a fault.
    assert b.breaker.state is BreakerState.CLOSED


async def test_requests_per_minute_hold_across_processes(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p) for p in two_processes)
    a, b = ga.get(MODEL, rpm=3), gb.get(MODEL, rpm=3)
    assert await a.admit(10, 0)
    assert await b.admit(10, 0)
    assert await a.admit(10, 0)
    # The minute's three requests are used: neither may start one now.
    assert not await b.admit(10, 0)
    assert not await a.admit(10, 0)


async def test_tokens_per_minute_hold_across_processes(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    ga, gb = (guards(p) for p in two_processes)
    a, b = ga.get(MODEL, tpm=1000), gb.get(MODEL, tpm=1000)
    assert await a.admit(700, 0)
    assert not await b.admit(700, 0)
    assert await b.admit(300, 0)
    # A refused call reserved nothing: the requests it did not make are still free.
    assert not await a.admit(1, 0)


async def test_a_429_seen_by_one_runner_sends_the_other_to_the_next_model(
    two_processes: tuple[RedisParts, RedisParts], simulator: Simulator
) -> None:
    """Through the real runner and client: process A's call gets a 429; process B's next
    call does not try that model at all."""
    url = simulator.base_url or ""

    def runner(parts: RedisParts) -> ModelRunner:
        entries = [
            ModelEntry(name, "m", ProviderClient(name, url, None), ModelPrice(1.0, 2.0))
            for name in ("sim-a", "sim-b")
        ]
        models = ModelRegistry(entries, {"cheap": [e.ref for e in entries]})
        settings = ResilienceSettings(retries=0, hedge_after_seconds=None, chain_walks=1)
        return ModelRunner(models, Guards(settings, shared=parts), settings)

    async def ask(r: ModelRunner) -> list[tuple[str, str]]:
        spec = CallSpec([ChatMessage("user", "coupon code?")], max_tokens=50)
        call = r.call("cheap", spec, time.monotonic() + 20)
        text = "".join([d async for d in call.deltas()])
        assert text and not call.result.failed
        return [(rec.provider, rec.outcome) for rec in call.result.records]

    ra, rb = runner(two_processes[0]), runner(two_processes[1])
    try:
        async with httpx.AsyncClient() as c:
            faults = url.removesuffix("/v1") + "/_sim/faults"
            r = await c.post(faults, json={"fault": "429", "count": 1, "retry_after": 30})
            r.raise_for_status()
        assert await ask(ra) == [("sim-a", "rate_limit"), ("sim-b", "ok")]
        await ra.guards.aclose()
        assert await ask(rb) == [("sim-b", "ok")]
    finally:
        await ra.models.aclose()
        await rb.models.aclose()


# -- budgets -----------------------------------------------------------------------------------


async def test_spend_in_one_process_exhausts_the_days_budget_in_the_other(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    settings = BudgetSettings(per_day=1.0, anonymous_per_day=0.5)
    a, b = (SharedBudgets(settings, p) for p in two_processes)
    today = datetime.now(UTC).date()
    # Both start with the ledger's figure for today: it counts once.
    a.seed(today, 0.3)
    b.seed(today, 0.3)
    await a.totals.sync()
    await b.totals.sync()
    assert b.state(0.0) is BudgetState.OK
    assert b.spent_today == pytest.approx(0.3)
    a.add(0.4)
    assert a.state(0.0) is BudgetState.OK  # a's own spend counts at once
    await a.totals.sync()
    await b.totals.sync()
    assert b.state(0.0) is BudgetState.OK
    a.add(0.2)
    await a.totals.sync()
    await b.totals.sync()
    assert b.state(0.0) is BudgetState.DEGRADE  # 0.9 of 1.0
    b.add(0.15, anonymous=True)
    await b.totals.sync()
    await a.totals.sync()
    assert a.state(0.0) is BudgetState.EXHAUSTED
    assert a.spent_today == pytest.approx(1.05)
    assert a.anonymous_today == pytest.approx(0.15)


async def test_anonymous_spend_is_shared(two_processes: tuple[RedisParts, RedisParts]) -> None:
    settings = BudgetSettings(anonymous_per_day=0.5)
    a, b = (SharedBudgets(settings, p) for p in two_processes)
    a.add(0.3, anonymous=True)
    b.add(0.3, anonymous=True)
    await a.totals.sync()
    await b.totals.sync()
    await a.totals.sync()
    for budgets in (a, b):
        assert budgets.state(0.0, anonymous=True) is BudgetState.EXHAUSTED
        assert budgets.state(0.0) is BudgetState.OK  # known shoppers are not held back


async def test_the_background_sync_carries_spend_between_processes(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    settings = BudgetSettings(per_day=1.0)
    a, b = (SharedBudgets(settings, p) for p in two_processes)
    a.start()
    b.start()
    try:
        a.add(2.0)

        async def exhausted() -> bool:
            return b.state(0.0) is BudgetState.EXHAUSTED

        await until(exhausted)
    finally:
        await a.aclose()
        await b.aclose()


# -- sign-in limits --------------------------------------------------------------------------


async def test_a_sign_in_lockout_holds_in_every_process(
    two_processes: tuple[RedisParts, RedisParts],
) -> None:
    a, b = (SharedSignInLimits(p) for p in two_processes)
    email = "mia@shop.test"
    for _ in range(FAILURES_PER_EMAIL - 1):
        await a.failed(email, IP)
    assert await b.retry_after(email, IP) == 0
    await b.failed(email, "198.51.100.1")  # the last one from elsewhere, via the other process
    assert await a.retry_after(email, "192.0.2.9") > 60
    assert await b.retry_after(email, IP) > 60
    assert await b.retry_after("leo@shop.test", IP) == 0  # the client is not locked yet
    # Another process signed the address in (an agent who knew the password after all).
    await b.succeeded(email)
    assert await a.retry_after(email, IP) == 0


async def test_sign_in_limits_in_memory_are_per_process() -> None:
    a, b = SignInLimits(), SignInLimits()
    for _ in range(FAILURES_PER_EMAIL):
        await a.failed("mia@shop.test", IP)
    assert await a.retry_after("mia@shop.test", IP) > 60
    assert await b.retry_after("mia@shop.test", IP) == 0


# -- memory mode, Redis restarts ---------------------------------------------------------------


async def test_the_embedded_mode_keeps_everything_in_process() -> None:
    g = Guards(ResilienceSettings())
    assert g.shared is None
    assert type(g.get(MODEL, rpm=10)) is ModelGuard
    assert type(Budgets(BudgetSettings())) is Budgets


async def test_a_redis_restart_breaks_nothing_and_the_shared_state_comes_back(
    tmp_path: Path,
) -> None:
    async with private_redis(tmp_path) as server:
        pa, pb = (RedisParts.connect(server.url, server.url, server.url, "t") for _ in "ab")
        try:
            await _through_a_restart(server, pa, pb)
        finally:
            await pa.aclose()
            await pb.aclose()


async def _through_a_restart(server: PrivateRedis, pa: RedisParts, pb: RedisParts) -> None:
    ga, gb = (guards(p, breaker_failures=1) for p in (pa, pb))
    a, b = ga.get(MODEL, rpm=1000), gb.get(MODEL, rpm=1000)
    budgets_a, budgets_b = (SharedBudgets(BudgetSettings(per_day=1.0), p) for p in (pa, pb))
    signin = SharedSignInLimits(pa)
    budgets_a.add(0.6)
    await budgets_a.totals.sync()
    await budgets_b.totals.sync()

    server.stop()
    # Down: every part answers from this process's own state, at once and without raising.
    assert await a.admit(10, 1)
    a.cool(30)  # told to nobody, but held here
    await ga.aclose()
    assert not await a.admit(10, 1)
    assert await b.admit(10, 1)
    budgets_b.add(0.25)
    await budgets_b.aclose()  # its last sync cannot reach Redis: the spend stays pending
    assert budgets_b.state(0.0) is BudgetState.DEGRADE
    for _ in range(FAILURES_PER_EMAIL):
        await signin.failed("mia@shop.test", IP)
    assert await signin.retry_after("mia@shop.test", IP) > 60  # this process's own count

    await server.restart()  # everything in Redis is gone
    # The day's spend is rebuilt from what the processes knew, B's offline spend included.
    budgets_b.start()
    try:

        async def spend_back() -> bool:
            with contextlib.suppress(RedisUnavailable):
                await budgets_a.totals.sync()
            budgets_a.state(0.0)  # the view is read on the hot path
            return budgets_a.spent_today == pytest.approx(0.85)

        await until(spend_back)
    finally:
        await budgets_b.aclose()

    # Shared again: a breaker B opens once it reaches Redis holds A off.
    assert ga.shared is not None and gb.shared is not None
    outage_a, outage_b = ga.shared.outage, gb.shared.outage

    async def b_back() -> bool:
        return await gb.get("sim/probe").admit(1, 0) and not outage_b.down

    await until(b_back)
    gb.get("sim/x").breaker.record(ok=False)
    await gb.aclose()

    async def a_held() -> bool:
        return not await ga.get("sim/x").admit(1, 0)

    await until(a_held)
    assert not outage_a.down
    assert await signin.retry_after("leo@shop.test", IP) == 0
