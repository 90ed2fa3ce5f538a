#!/usr/bin/env bash
# Installs everything the gateway, its demo and its tests need; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.agw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi

# anvil (local chain) and solc come from npm; the lock file pins them.
if command -v npm >/dev/null 2>&1; then
  if [ ! -x node_modules/.bin/anvil ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup: installing npm packages (anvil, solc)"
    npm ci --no-audit --no-fund --loglevel=error
  fi
else
  echo "setup: npm not found; install Node.js 18+ for the local chain (anvil)" >&2
  exit 1
fi
# Headless Chromium and its driver, from Debian, for the dashboard's browser tests.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (apt-get)"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
  else
    echo "setup: apt-get not found; install chromium and chromedriver at /usr/bin for the browser tests" >&2
    exit 1
  fi
fi
echo "setup: ready"
