#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the demo job: generated shards on a local
# S3-compatible server, a tiny LLaVA checkpoint, local Ray, Parquet written back to the bucket.
# Extra arguments go to `llava-pipeline demo`, e.g. scripts/demo.sh --shards 8
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/llava-pipeline demo "$@"
