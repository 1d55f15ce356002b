"""Which service code a run measures: the working tree or a git ref exported for it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

SERVICE_DIRS = (
    "bot",
    "channels",
    "orchestration",
    "storage",
    "migrations",
    "simulator",
    "config_section.py",
)


def export_ref(ref: str, dest: Path) -> Path:
    """`git archive` of `ref` unpacked into `dest` (to run a commit, not the working tree).
    Older commits lack some of SERVICE_DIRS (the simulator moved out of orchestration)."""
    dest.mkdir(parents=True)
    listed = _git("ls-tree", "--name-only", ref) or ""
    present = [d for d in SERVICE_DIRS if d in listed.splitlines()]
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, *present],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"bench: git archive {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _git(*argv: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_fingerprint(root: Path = REPO_ROOT, ref: str | None = None) -> dict[str, Any]:
    """Which service code was measured: the commit, uncommitted changes, a hash of the sources."""
    digest = hashlib.sha256()
    for d in SERVICE_DIRS:
        top = root / d
        for f in sorted(top.rglob("*")) if top.is_dir() else [top] if top.exists() else []:
            if (
                f.is_file()
                and f.suffix in (".py", ".yaml", ".json")
                and "__pycache__" not in f.parts
            ):
                digest.update(str(f.relative_to(root)).encode())
                digest.update(f.read_bytes())
    info: dict[str, Any] = {
        "source": f"git {ref}" if ref else "working tree",
        "commit": _git("rev-parse", "--short", ref or "HEAD"),
        "sources_sha256": digest.hexdigest()[:16],
    }
    if ref is None:
        status = _git("status", "--porcelain", "--", *SERVICE_DIRS)
        info["uncommitted_files"] = len(status.splitlines()) if status is not None else None
    return info
