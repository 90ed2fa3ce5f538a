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
# Another apt-get (unattended upgrades on a fresh machine, a second terminal) may hold the dpkg
# lock: wait for it, bounded, saying so, instead of failing at once.
APT_LOCK_WAIT_S="${AGW_APT_LOCK_WAIT_S:-300}"
wait_for_dpkg_lock() {
  command -v fuser >/dev/null 2>&1 || return 0  # apt-get's own lock timeout still applies
  local waited=0
  while ${SUDO:-} fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1; do
    if [ "$waited" -ge "$APT_LOCK_WAIT_S" ]; then
      echo "setup: another apt/dpkg still holds its lock after ${APT_LOCK_WAIT_S}s; let it finish and run setup again" >&2
      exit 1
    fi
    if [ $((waited % 15)) -eq 0 ]; then
      echo "setup: another apt/dpkg is running (it holds the dpkg lock); waiting up to ${APT_LOCK_WAIT_S}s (${waited}s so far)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}
# Headless Chromium and its driver, from Debian, for the dashboard's browser tests.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (apt-get)"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    wait_for_dpkg_lock
    # apt >= 1.9 waits for the lock itself too, should another apt-get take it in between.
    apt="apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT_S"
    $SUDO env DEBIAN_FRONTEND=noninteractive $apt update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive $apt install -y -q --no-install-recommends chromium chromium-driver
  else
    echo "setup: apt-get not found; install chromium and chromedriver at /usr/bin for the browser tests" >&2
    exit 1
  fi
fi
echo "setup: ready"
