#!/usr/bin/env bash
# Creates .venv and installs the project with its tested dependency versions.
# Idempotent: does nothing when pyproject.toml and constraints.txt are unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.llava-pipeline-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "==> Creating $VENV with $($PYTHON --version) and installing llava-pipeline (first run takes a few minutes)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "==> Installed: $("$VENV/bin/llava-pipeline" --version)"
