"""The one error of the knowledge base a user can cause (a bad file, a bad name)."""

from __future__ import annotations


class KnowledgeError(ValueError):
    """A document or request the knowledge base can't use; the message says what to do."""
