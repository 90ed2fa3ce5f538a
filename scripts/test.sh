#!/usr/bin/env bash
# Set up, then run every test (unit, integration on SQLite and PostgreSQL, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
