"""Intent routing, cheapest first: rules and FAQ, a local classifier, then an LLM if unsure."""

from orchestration.routing.config import BUILTIN_LABELS, RoutingSettings
from orchestration.routing.decision import RoutingDecision, RoutingTrace
from orchestration.routing.llm import (
    ClassifyError,
    LlmClassify,
    LlmVerdict,
    parse_verdict,
    registry_classifier,
)
from orchestration.routing.router import Router

__all__ = [
    "BUILTIN_LABELS",
    "ClassifyError",
    "LlmClassify",
    "LlmVerdict",
    "Router",
    "RoutingDecision",
    "RoutingSettings",
    "RoutingTrace",
    "parse_verdict",
    "registry_classifier",
]
