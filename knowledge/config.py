"""The `knowledge:` section of swarmdesk.yaml."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection, matching
from knowledge.base import DEFAULT_COLLECTION

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CollectionName = Annotated[
    str,
    matching(
        COLLECTION_NAME, "a collection name is 1-64 letters, digits, '_', '.' or '-' (e.g. brand-a)"
    ),
]
_CHANNEL = re.compile(r"^(\*|[a-z_]+:[^\s:]+)$")


class WatchedFolder(ConfigSection):
    """A folder whose documents are kept indexed: new and changed files are added, deleted
    ones removed (checked every `watch_seconds`)."""

    path: str = Field(description="a folder of .md, .txt, .html, .pdf, .csv, .json files")
    collection: CollectionName = DEFAULT_COLLECTION
    url_prefix: str | None = Field(
        None,
        description="shopper-facing link of a file = this + '/' + the file's stem, when the "
        "file names none itself (e.g. https://shop.example/help)",
    )


class CollectionRoute(ConfigSection):
    """Which conversations read a collection: `channel:account` patterns, first match wins."""

    name: CollectionName
    channels: list[str] = Field(
        min_length=1,
        description='"widget:SITE_KEY", "api:ACCOUNT", "telegram:*", "wechat:gh_xxx" or "*"',
    )

    @field_validator("channels")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _CHANNEL.match(pattern):
                raise ValueError(
                    f"'{pattern}': write channel:account, e.g. 'widget:shop-a', "
                    "'telegram:*', or '*' for every conversation"
                )
        return v


class EmbeddingsSettings(ConfigSection):
    """Optional: embeddings from an OpenAI-compatible /v1/embeddings, fused with BM25."""

    provider: str = Field(description="the name of an entry of `providers`")
    model: str = Field(description="the embeddings model, e.g. text-embedding-3-small")
    batch_size: int = Field(64, ge=1, le=2048)
    timeout_seconds: float = Field(10.0, gt=0)
    min_similarity: float = Field(
        0.5, ge=-1, le=1, description="cosine a passage needs to count without shared words"
    )


class KnowledgeSettings(ConfigSection):
    """The shop's documents the bot answers policy and product questions from."""

    folders: list[WatchedFolder] = Field(default_factory=list)
    collections: list[CollectionRoute] = Field(
        default_factory=list,
        description="per-site or per-account collections; unmatched conversations read "
        f"'{DEFAULT_COLLECTION}'",
    )
    max_file_mb: float = Field(20.0, gt=0, le=1024, description="larger files are refused")
    chunk_chars: int = Field(600, ge=100, le=10_000, description="about this long a passage")
    k: int = Field(3, ge=1, le=20, description="passages a specialist reads per question")
    min_relevance: float = Field(
        0.3,
        ge=0,
        le=1,
        description="share (idf-weighted) of the question's words a passage must contain; "
        "higher: fewer, surer answers (0.3 scores hit@3 100% on the demo shop's questions "
        "and turns away 17 of 18 off-topic ones)",
    )
    refresh_seconds: float = Field(
        1.0, ge=0, description="how often a search checks for changes made by other processes"
    )
    watch_seconds: float = Field(10.0, gt=0, description="how often watched folders are scanned")
    embeddings: EmbeddingsSettings | None = None

    @model_validator(mode="after")
    def _unique_collections(self) -> KnowledgeSettings:
        names = [c.name for c in self.collections]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"collections: {dupes} listed twice; give each collection one entry with all "
                "its channels"
            )
        return self

    def collection_for(self, channel: str, account: str) -> str:
        key = f"{channel}:{account}"
        for route in self.collections:
            for pattern in route.channels:
                if pattern == "*" or pattern == key:
                    return route.name
                if pattern.endswith(":*") and pattern[:-2] == channel:
                    return route.name
        return DEFAULT_COLLECTION
