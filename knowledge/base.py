"""What the rest of swarmdesk sees of the shop's knowledge: passages found for a question.

`orchestration` depends on this module only (the `search_knowledge` tool and the passages a
specialist reads); the package's other modules ingest, index and store documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DEFAULT_COLLECTION = "default"


@dataclass(frozen=True, slots=True)
class Passage:
    """One chunk of a shop document that answers (part of) a question."""

    chunk_id: int
    document_id: int
    collection: str
    source: str  # where the document was added from (a path or a file URL)
    title: str  # the document's title
    heading: str  # the section's heading path, "Returns › Opened items" ("" at the top)
    text: str
    url: str | None  # the link a shopper may open, when the document has one
    version: int  # the document's version when this chunk was indexed
    score: float  # relevance, higher is better (comparable within one search only)


class KnowledgeSearch(Protocol):
    """Search of one deployment's knowledge base, by collection."""

    def collection_for(self, channel: str, account: str) -> str:
        """The collection a conversation on (channel, account) reads: its site's or
        account's own, else DEFAULT_COLLECTION."""
        ...

    async def search(self, query: str, *, collection: str, k: int = 3) -> list[Passage]:
        """The best `k` passages of `collection` for `query`, best first; [] when nothing in
        the collection is relevant enough to answer from (the caller must not guess)."""
        ...
