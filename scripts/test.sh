#!/usr/bin/env bash
# Set up lamina with its test dependencies, then run every check CI runs: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
trap 'echo "scripts/test.sh: done in $((SECONDS - start)) s" >&2' EXIT
bash scripts/setup.sh --test
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy lamina
# two pytest-xdist workers (one torch thread each; tests/conftest.py), a test file per worker at a time
"$PY" -m pytest -q -n 2 --dist loadfile "$@"
