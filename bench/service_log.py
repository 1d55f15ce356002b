"""What the service logged: counts of its JSON log lines and the first warnings."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any


def scan_json_log(path: Path, excerpt_lines: int = 12) -> dict[str, Any]:
    """Counts of the service's JSON log lines by level and event, and the first warnings+."""
    counts: Counter[str] = Counter()
    excerpt: list[str] = []
    other = 0
    try:
        lines = path.read_text("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            other += 1
            if len(excerpt) < excerpt_lines:
                excerpt.append(line[:500])
            continue
        if not isinstance(rec, dict):
            other += 1
            continue
        level = str(rec.get("level", "?"))
        counts[f"{level}:{rec.get('event', '?')}"] += 1
        if level in ("warning", "error", "critical") and len(excerpt) < excerpt_lines:
            excerpt.append(line[:500])
    return {"counts": dict(counts.most_common()), "non_json_lines": other, "excerpt": excerpt}
