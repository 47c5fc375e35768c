#!/usr/bin/env bash
# Runs lint and the whole test suite (unit, integration; GPU tests where CUDA is present) after
# making sure the environment is installed. Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check pipeline tests
.venv/bin/ruff format --check pipeline tests
exec .venv/bin/python -m pytest "$@"
