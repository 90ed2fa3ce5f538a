#!/usr/bin/env bash
# The main job on embedded defaults: set up, then run the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/agent-gateway demo "$@"
