#!/usr/bin/env bash
# Set up, check the floors (lint-imports) and the types (mypy), then run every test (unit,
# integration on SQLite and PostgreSQL, end to end).
#
# The tests spread over AGW_TEST_WORKERS worker processes (pytest-xdist, default 4: the suite mostly
# waits on gateway processes, anvil, PostgreSQL and Chromium, so more workers than cores pays), a
# test file per worker at a time (--dist loadfile: module-scoped fixtures are built once).
# Options pass through to pytest; `-n 0` runs everything in this one process:
#   ./scripts/test.sh -k proxy -x        ./scripts/test.sh -n 0 tests/e2e/test_proxy.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lint-imports and mypy side by side (each mostly one core), their output shown in order.
checks=$(mktemp -d)
trap 'rm -rf "$checks"' EXIT
.venv/bin/lint-imports >"$checks/lint" 2>&1 & lint_pid=$!
.venv/bin/mypy >"$checks/mypy" 2>&1 & mypy_pid=$!
lint_rc=0; wait "$lint_pid" || lint_rc=$?
mypy_rc=0; wait "$mypy_pid" || mypy_rc=$?
cat "$checks/lint" "$checks/mypy"
if [ "$lint_rc" -ne 0 ] || [ "$mypy_rc" -ne 0 ]; then
  echo "test: lint-imports exited $lint_rc, mypy exited $mypy_rc" >&2
  exit 1
fi
rm -rf "$checks"; trap - EXIT
exec .venv/bin/python -m pytest -n "${AGW_TEST_WORKERS:-4}" --dist loadfile "$@"
