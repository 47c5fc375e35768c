#!/usr/bin/env bash
# Creates .venv and installs the project with its tested dependency versions.
# Idempotent: does nothing when pyproject.toml and constraints.txt are unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.llava-pipeline-installed"

# The run report's test renders it in headless Chromium (tests/integration/test_observability.py). Debian's
# package, installed once, where apt-get can (as root, or through sudo without a password).
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null; then
  as_root=()
  if [[ "$(id -u)" != 0 ]]; then as_root=(sudo -n); fi
  echo "==> Installing Chromium (Debian package) for the report's browser test"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
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
