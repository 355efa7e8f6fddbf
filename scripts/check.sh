#!/usr/bin/env bash
# The static checks, the same locally and in CI: ruff (lint + format), mypy, import boundaries.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANOFLEET_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
echo "== ruff check"; ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy"; mypy
echo "== import boundaries"; lint-imports
