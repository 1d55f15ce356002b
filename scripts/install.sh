#!/usr/bin/env bash
# Installs swarmdesk and its development tools into ./.venv (idempotent: a second run is quick).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
