"""Money budgets per conversation and per day (DESIGN.md, Orchestration)."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime

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
