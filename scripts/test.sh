#!/usr/bin/env bash
# The whole suite: install what is missing, run the static checks, then pytest with coverage.
# Extra arguments go to pytest (e.g. scripts/test.sh -k protocol).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANOFLEET_VENV:-.venv}
bash scripts/bootstrap.sh
bash scripts/check.sh
export PATH="$PWD/$VENV/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
echo "== pytest"
# pytest exits 5 when it collects no test: with set -e that fails the run, as it should.
# The 20 slowest tests are listed at the end, so a run that creeps past 15 minutes says why.
python -m pytest --cov --cov-report=term:skip-covered --durations=20 "$@"
