#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on the embedded default (no etcd, no GPU):
# a daemon, the real all-MiniLM-L6-v2 weights loaded into it, read back from other processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
