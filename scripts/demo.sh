#!/usr/bin/env bash
# The main job from nothing: set-up, then the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mmfast demo "$@"
