#!/usr/bin/env bash
# The main job: install what is missing, then run the local fleet demo on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANOFLEET_VENV:-.venv}
bash scripts/bootstrap.sh
export PATH="$PWD/$VENV/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec nanofleet demo "$@"
