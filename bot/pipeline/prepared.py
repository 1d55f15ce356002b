"""What ingest already knows of a message the worker is about to answer, handed over in
memory so the worker needn't read it back: the stored message and, when the conversation
was idle, the answer reserved in the same transaction (storage.inbound.store_inbound).

A shortcut, not a source of truth: whatever is missing here (another replica stored the
message, recovery queued it, the bound dropped it) the worker reads from the database.
"""

from __future__ import annotations

from typing import TypeVar

from storage.answers import Answering
from storage.rows import StoredMessage

# A bound, for work another replica takes (scale-out) and never takes from here.
MAX_PREPARED = 10_000
V = TypeVar("V")


class PreparedTurns:
    def __init__(self, limit: int = MAX_PREPARED) -> None:
        self._limit = limit
        self._views: dict[int, StoredMessage] = {}
        self._answers: dict[int, Answering] = {}

    def keep(self, view: StoredMessage, answering: Answering | None) -> None:
        _bounded_put(self._views, view.id, view, self._limit)
        if answering is not None:
            # (begin_answer takes over a reservation it doesn't know of)
            _bounded_put(self._answers, view.id, answering, self._limit)

    def take(self, message_id: int) -> tuple[StoredMessage | None, Answering | None]:
        return self._views.pop(message_id, None), self._answers.pop(message_id, None)

    def edited(self, view: StoredMessage) -> None:
        """The shopper edited a message not answered yet: the worker sees the new text."""
        if view.id in self._views:
            self._views[view.id] = view
        answering = self._answers.get(view.id)
        if answering is not None:
            answering.question = answering.question._replace(text=view.text)


def _bounded_put(d: dict[int, V], key: int, value: V, limit: int) -> None:
    if len(d) >= limit:
        del d[next(iter(d))]
    d[key] = value
