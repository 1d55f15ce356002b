"""Value types shared by the LLM client, the simulator and the orchestration layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


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
class ToolCall:
    """One function call a model asked for; `arguments_json` is the model's JSON text as is
    (it may be invalid JSON: the tool runner reports that back to the model)."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> str:
        """The same as `arguments_json`."""
        return self.arguments_json

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    # An assistant message that called tools; a "tool" message answers one of those calls
    # by its id (and may carry the tool's name).
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    # The provider's continuation flag on a final assistant message ("prefix": DeepSeek,
    # "partial": Kimi): the model writes on from exactly this text.
    continue_flag: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The message in OpenAI's chat format."""
        if (
            not self.tool_calls
            and self.tool_call_id is None
            and self.name is None
            and self.continue_flag is None
        ):
            return {"role": self.role, "content": self.content}
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.continue_flag is not None:
            out[self.continue_flag] = True
        if self.tool_calls:
            out["content"] = self.content or None  # OpenAI's shape for a pure tool call
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


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
    # Function calls the model made ("tool_calls" finish), assembled from the stream.
    tool_calls: list[ToolCall] = field(default_factory=list)
