#!/usr/bin/env bash
# Set up (with the test extras) and run the checks CI runs: ruff, then the pytest suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check fluxkit tests benchmarks scripts
.venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip says why
