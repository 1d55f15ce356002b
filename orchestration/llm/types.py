"""Value types shared by the LLM client, the simulator and the orchestration layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ErrorKind(enum.StrEnum):
    """Why a model call failed; decides whether a retry or a fallback makes sense."""

    RATE_LIMIT = "rate_limit"  # 429; retry after `retry_after` seconds
    SERVER = "server_error"  # 5xx
    TIMEOUT = "timeout"  # connect/read timeout or no first token in time
    CONNECTION = "connection"  # refused, reset, DNS
    BAD_REQUEST = "bad_request"  # 400/404/422: our fault, retrying won't help
    AUTH = "auth"  # 401/403: key missing or wrong
    STREAM_CUT = "stream_cut"  # the stream ended without [DONE] / finish_reason

    @property
    def retryable(self) -> bool:
        return self not in (ErrorKind.BAD_REQUEST, ErrorKind.AUTH)


class LLMError(Exception):
    """A failed model call, classified."""

    def __init__(
        self,
        kind: ErrorKind,
        detail: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        partial_text: str = "",
    ) -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        # Text already streamed before the failure (for STREAM_CUT / mid-stream timeouts).
        self.partial_text = partial_text


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False  # True when counted by our estimator, not reported by the provider


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD (or the shop's currency) per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, usage: Usage) -> float:
        return (
            usage.input_tokens * self.input_per_mtok + usage.output_tokens * self.output_per_mtok
        ) / 1_000_000


@dataclass(slots=True)
class CallStats:
    """What one streamed call measured; filled in while the stream runs."""

    model: str
    provider: str
    started_at: float = 0.0  # time.monotonic()
    first_token_s: float | None = None  # seconds from start to first content delta
    total_s: float | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    text: str = ""
