#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole CPU test suite: real daemons, real etcd,
# real Mooncake Transfer Engine over TCP on loopback, a real vLLM engine (its own venv,
# scripts/setup-vllm.sh; TENSORD_SKIP_VLLM=1 skips it and its tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${TENSORD_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup-vllm.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
