#!/usr/bin/env bash
# Set up, check the floors (lint-imports) and the types (mypy), then run every test (unit,
# integration on SQLite and PostgreSQL, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
