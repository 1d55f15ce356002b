"""Optional embeddings through any OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, a
local vLLM / llama.cpp / Ollama server, the simulator). Nothing is downloaded: a provider
configured in `providers` does the work, or there are no embeddings and search is lexical."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from knowledge.config import EmbeddingsSettings
from knowledge.errors import KnowledgeError


class Provider(Protocol):
    """What the embeddings client needs of an entry of `providers` (ProviderSettings)."""

    name: str
    base_url: str

    def api_key(self) -> str | None: ...


class EmbeddingsError(RuntimeError):
    """The endpoint failed or answered something unusable (search goes lexical)."""


class EmbeddingsClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        batch_size: int = 64,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_seconds
        )

    @classmethod
    def from_settings(
        cls, settings: EmbeddingsSettings, providers: Sequence[Provider]
    ) -> EmbeddingsClient:
        for p in providers:
            if p.name == settings.provider:
                return cls(
                    p.base_url,
                    settings.model,
                    api_key=p.api_key(),
                    batch_size=settings.batch_size,
                    timeout_seconds=settings.timeout_seconds,
                )
        known = ", ".join(p.name for p in providers) or "none"
        raise KnowledgeError(
            f"knowledge.embeddings.provider: '{settings.provider}' is not in `providers` "
            f"(configured: {known}); name one of them or remove knowledge.embeddings"
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order. Raises EmbeddingsError."""
        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            out.extend(await self._batch(batch))
        return out

    async def _batch(self, texts: list[str]) -> list[list[float]]:
        try:
            response = await self._http.post(
                "/embeddings", json={"model": self.model, "input": texts}
            )
            response.raise_for_status()
            body: Any = response.json()
            items = sorted(body["data"], key=lambda d: int(d.get("index", 0)))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise EmbeddingsError(f"embeddings call failed: {type(e).__name__}: {e}") from e
        if len(vectors) != len(texts):
            raise EmbeddingsError(f"asked {len(texts)} embeddings, got {len(vectors)}")
        return vectors

    async def aclose(self) -> None:
        await self._http.aclose()
