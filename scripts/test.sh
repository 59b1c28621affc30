#!/usr/bin/env bash
# The test command: sets up (idempotent), then lint, types, protos, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

ruff check .
ruff format --check .
mypy
bash scripts/check_protos.sh
python -m pytest -q -p no:cacheprovider "$@"
