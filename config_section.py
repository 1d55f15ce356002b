"""The base of every section model of swarmdesk.yaml: a typo in a key is an error, never a
silently ignored setting (`swarmdesk config check` names the unknown key).

A top-level module of its own because every layer's settings use it: `bot`, `channels` and
`orchestration` each define their sections, and the dependency rule (DESIGN.md) lets
`channels` and `orchestration` import neither `bot` nor each other. It depends on pydantic
only, so it sits below all of them.
"""

from __future__ import annotations

import re

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """A mapping in swarmdesk.yaml; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


def matching(pattern: re.Pattern[str], advice: str) -> AfterValidator:
    """A field check, for `Annotated[str, matching(...)]`: a value `pattern` does not match
    is refused with `advice` (say what to write, not what went wrong)."""

    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(advice)
        return value

    return AfterValidator(check)
