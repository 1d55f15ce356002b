#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotent), then lint, types and tests.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database "test"); see README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
