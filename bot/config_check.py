"""`swarmdesk config check`: validate a config file and say how to fix each mistake."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from bot import safety
from bot.settings import ConfigError, Settings, config_path, load_settings
from channels.peers import loopback


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (to suggest the key meant)."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        model = inner[0] if inner else ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def explain(error: ValidationError | ConfigError, path: str | os.PathLike[str] | None) -> str:
    where = str(config_path(path) or "built-in defaults")
    if isinstance(error, ConfigError):
        return f"config error: {error}"
    lines = [f"{where}: {error.error_count()} problem(s)"]
    for err in error.errors():
        loc = tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            key = str(loc[-1])
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(key, list(owner.model_fields), n=1)
                allowed = ", ".join(owner.model_fields)
                hint = f" - did you mean '{close[0]}'?" if close else f" (allowed: {allowed})"
            msg = f"unknown key{hint}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err['input']!r})"
        msg = msg.removeprefix("Value error, ")
        # Cross-reference checks name their own path ("tiers.cheap[0]: ...").
        lines.append(f"  - {msg}" if not loc else f"  - {_loc(loc)}: {msg}")
    return "\n".join(lines)


def check(path: str | os.PathLike[str] | None) -> tuple[bool, str]:
    p = config_path(path)
    if path and not Path(path).exists():
        return False, f"config error: {path}: file not found"
    try:
        settings = load_settings(path)
    except (ConfigError, ValidationError) as e:
        return False, explain(e, path)
    where = p or "built-in defaults"
    refused = safety.problems(settings)
    if refused:
        lines = [f"{where}: may not serve shoppers ({len(refused)} problem(s)):"]
        return False, "\n".join([*lines, *(f"  - {r}" for r in refused)])
    notes = [f"{where}: OK"]
    if safety.is_embedded_demo(settings):
        notes.append(
            "  note: the embedded demo (loopback, no providers): the model simulator, the demo "
            "shop and its page answer; name a provider to serve real shoppers"
        )
    elif not settings.uses_simulator() and "cheap" not in settings.tiers:
        return False, f"{p}: tiers.cheap is missing: name the models that answer by default"
    api = settings.channels.api
    if api.enabled and not os.environ.get(api.api_key_env):
        notes.append(
            f"  note: channels.api: {api.api_key_env} is not set; only the development key "
            "works, and only on a loopback address"
        )
    notes += [f"  WARNING: {w}" for w in safety.warnings(settings)]
    wechat = settings.channels.wechat
    for acc in wechat.official_accounts if wechat.enabled else []:
        if acc.mode() != "safe":
            notes.append(
                f"  WARNING: channels.wechat.official_accounts[{acc.name}]: {acc.mode()} mode "
                "sends message bodies unsigned; use safe mode (encryption: safe, aes_key_env)"
            )
    notes += _distributed_notes(settings)
    for i, folder in enumerate(settings.knowledge.folders):
        if not Path(folder.path).is_dir():
            notes.append(
                f"  WARNING: knowledge.folders[{i}].path: {folder.path} is not a folder here; "
                "create it (its documents are what the bot answers rules questions from) or "
                "fix the path"
            )
    return True, "\n".join(notes)


def _distributed_notes(settings: Settings) -> list[str]:
    """What the distributed mode (queue.backend: redis) needs that a file cannot show."""
    if not settings.distributed:
        return []
    q = settings.queue
    out = [
        f"  note: queue.backend redis: processes share the work through {_redacted(q.url)} "
        f"(prefix '{q.key_prefix}', {q.partitions} partitions); a process that dies hands its "
        f"conversations over after {q.lease_seconds:g} s. Every process needs the same "
        "database, Redis and queue.partitions"
    ]
    urls = {settings.redis_url(part): part for part in ("state", "bus", "queue")}
    for url, part in urls.items():
        parsed = urlsplit(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            out.append(f"  WARNING: {part}: Redis URL {_redacted(url)!r}: use redis://host:port/db")
            continue
        if not loopback(parsed.hostname or "127.0.0.1") and not parsed.password:
            out.append(
                f"  WARNING: {part}: Redis at {parsed.hostname} without a password: it holds "
                "the work queue and platform access tokens; set one "
                "(redis://:PASSWORD@host) and prefer rediss:// beyond one machine"
            )
    if q.lease_seconds < 3:
        out.append(
            f"  WARNING: queue.lease_seconds {q.lease_seconds:g}: a process paused this long "
            "(a GC, a slow disk) loses its conversations mid-answer; 10 is a safe default"
        )
    return out


def _redacted(url: str) -> str:
    parsed = urlsplit(url)
    if parsed.password:
        return url.replace(parsed.password, "***", 1)
    return url
