#!/usr/bin/env bash
# Set up (venv, system tools the deployment tests run for real) and run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/test_sampling.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ci_system_deps.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
