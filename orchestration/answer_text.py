"""The text of one answer as it goes out to the shopper (a turn's single source of deltas)."""

from __future__ import annotations

from collections.abc import Callable

from orchestration.events import Delta, ReplyEvent, Retract, Visibility


class AnswerText:
    """Every delta emitted once, and withdrawn only while the shopper has seen none of it
    (`Visibility`)."""

    def __init__(self, emit: Callable[[ReplyEvent], None], visibility: Visibility | None) -> None:
        self.record = emit
        self.visibility = visibility
        self.text = ""
        self.broken = False  # a cut answer nobody could finish

    @property
    def shown(self) -> bool:
        return bool(self.text)

    def add(self, delta: str, *, separate: bool = False) -> None:
        if separate and self.text:
            delta = "\n\n" + delta
        if delta:
            self.text += delta
            self.record(Delta(delta))

    def withdraw(self) -> bool:
        """Take back everything sent so far; False if the shopper may have seen it."""
        if not self.text:
            return True
        if self.visibility is None or not self.visibility.withdraw():
            return False
        self.text = ""
        self.record(Retract())
        return True

    def seen(self, _attempt_text: str) -> bool:
        """For ModelRunner.call: a failed attempt's text stays (and is continued) only if
        the shopper may have seen it."""
        return not self.withdraw()
