"""Money budgets per conversation and per day (DESIGN.md, Orchestration)."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime

from cluster.redis import RedisParts
from cluster.totals import SharedTotals
from orchestration.config import BudgetSettings


class BudgetState(enum.StrEnum):
    OK = "ok"
    DEGRADE = "degrade"  # cheap tier only, no paid classification
    EXHAUSTED = "exhausted"  # templates only, then a person


class Budgets:
    """Tracks today's spend in-process (seeded from the ledger at start)."""

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.day = datetime.now(UTC).date()
        self.spent_today = 0.0
        # The part of it spent on anonymous shoppers (in-process since the start: a restart
        # gives them today's budget again, which a flood cannot trigger).
        self.anonymous_today = 0.0

    def _roll(self) -> None:
        today = datetime.now(UTC).date()
        if today != self.day:
            self.day, self.spent_today, self.anonymous_today = today, 0.0, 0.0

    def seed(self, day: date, spent: float) -> None:
        self.day, self.spent_today = day, spent

    def add(self, cost: float, *, anonymous: bool = False) -> None:
        self._roll()
        self.spent_today += cost
        if anonymous:
            self.anonymous_today += cost

    def state(self, conversation_spent: float, *, anonymous: bool = False) -> BudgetState:
        self._roll()
        s = self.settings
        worst = BudgetState.OK
        limits = [(conversation_spent, s.per_conversation), (self.spent_today, s.per_day)]
        if anonymous:
            limits.append((self.anonymous_today, s.anonymous_per_day))
        for spent, limit in limits:
            if limit is None:
                continue
            if spent >= limit:
                return BudgetState.EXHAUSTED
            if spent >= limit * s.degrade_at:
                worst = BudgetState.DEGRADE
        return worst

    def used_share(self, conversation_spent: float, *, anonymous: bool = False) -> float:
        """How much of its closest-to-spent budget a conversation has used (0: no limit)."""
        self._roll()
        s = self.settings
        limits = [(conversation_spent, s.per_conversation), (self.spent_today, s.per_day)]
        if anonymous:
            limits.append((self.anonymous_today, s.anonymous_per_day))
        return max((spent / limit for spent, limit in limits if limit is not None), default=0.0)

    def start(self) -> None:
        """Nothing to start in-process (see SharedBudgets)."""

    async def aclose(self) -> None:
        """Nothing to stop in-process (see SharedBudgets)."""


class SharedBudgets(Budgets):
    """Today's spend (and its anonymous part) across all processes (queue.backend: redis).

    `state()` stays a local read: each process sees the others' spend at most about
    `cluster.totals.INTERVAL_S` (0.5 s) plus a round trip late, its own at once — so the
    processes together may overspend a day's budget by what they spend in that half second.
    The day's total is seeded from the ledger by whichever process finds it missing in Redis
    (first start, or after Redis lost it), so several processes starting do not count the
    ledger twice. While Redis is down each process limits on the last known total plus its
    own spend since.
    """

    def __init__(self, settings: BudgetSettings, cluster: RedisParts) -> None:
        super().__init__(settings)
        self._keys = cluster.keys
        self.totals = SharedTotals(cluster.state, what="budgets")
        self._follow(self.day)

    def _key(self, day: date, part: str) -> str:
        return self._keys("budget", day.isoformat(), part)

    def _follow(self, day: date) -> None:
        self._spent_key = self._key(day, "spent")
        self._anonymous_key = self._key(day, "anonymous")
        self.totals.add(self._spent_key, 0.0)
        self.totals.add(self._anonymous_key, 0.0)

    def _roll(self) -> None:
        today = datetime.now(UTC).date()
        if today != self.day:
            self.totals.retire(self._spent_key)
            self.totals.retire(self._anonymous_key)
            self.day = today
            self._follow(today)
        self.spent_today = self.totals.value(self._spent_key)
        self.anonymous_today = self.totals.value(self._anonymous_key)

    def seed(self, day: date, spent: float) -> None:
        if day != self.day:
            self.totals.retire(self._spent_key)
            self.totals.retire(self._anonymous_key)
            self.day = day
            self._follow(day)
        self.totals.seed(self._spent_key, spent)
        self.spent_today = self.totals.value(self._spent_key)

    def add(self, cost: float, *, anonymous: bool = False) -> None:
        self._roll()
        self.totals.add(self._spent_key, cost)
        self.spent_today += cost
        if anonymous:
            self.totals.add(self._anonymous_key, cost)
            self.anonymous_today += cost

    def start(self) -> None:
        self.totals.start()

    async def aclose(self) -> None:
        await self.totals.aclose()
