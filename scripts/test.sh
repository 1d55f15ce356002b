#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotent), then lint, types and tests.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database "test"); see README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# The widget's browser tests drive Debian's Chromium (never a downloaded browser build).
# A CJK font so Chinese text renders in them (and in the screenshots).
if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/wqy ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
    fonts-wqy-zenhei >/dev/null
fi
# The scale-out tests also run a private redis-server they can restart (the machine's Redis
# stays up); Debian's package, without starting its own service.
if [ ! -x /usr/bin/redis-server ]; then
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
