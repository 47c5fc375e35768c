#!/usr/bin/env bash
# Runs the whole test suite (unit and integration) after making sure the environment is installed.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
