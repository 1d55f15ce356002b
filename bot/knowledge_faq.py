"""What `swarmdesk kb faq` needs from the application: each generated FAQ entry's intent
(the router's, so the fast path answers it: the router answers from an FAQ entry only when
the message's intent is the entry's) and a check against the routing config's own schema."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import ValidationError

from bot.settings import Settings
from orchestration.routing import Router
from orchestration.routing.config import FaqSpec, RoutingSettings


class FaqCheckError(ValueError):
    """Generated entries the routing config would refuse (says which and why)."""


def check_faq(settings: Settings, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`entries` with the intent the router gives their questions, validated as FaqSpec and
    as additions to the deployment's `routing:` section."""
    router = Router(settings.routing)
    out: list[dict[str, Any]] = []
    for entry in entries:
        votes = Counter(router.route_local(str(q)).intents[0] for q in entry.get("questions", []))
        intent = votes.most_common(1)[0][0] if votes else "other"
        # A request for a person is never answered from an FAQ.
        out.append({**entry, "intent": "other" if intent == "human" else intent})
    try:
        specs = [FaqSpec.model_validate(e) for e in out]
        RoutingSettings.model_validate(
            {**settings.routing.model_dump(), "faq": [*settings.routing.faq, *specs]}
        )
    except ValidationError as e:
        raise FaqCheckError(f"the generated FAQ entries are not valid routing config: {e}") from e
    return out
