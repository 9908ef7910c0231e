#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole CPU test suite: real daemons, real etcd,
# real Mooncake Transfer Engine over TCP on loopback. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
