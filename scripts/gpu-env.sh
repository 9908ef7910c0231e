#!/usr/bin/env bash
# On a GPU host without network (the device machines), with ./.whl filled by
# ../shared/scripts/gpu-wheels.sh: install those wheels and etcd into /tmp, then run "$@".
#   bash scripts/gpu-env.sh python3 -m pytest -m "gpu or multigpu" tests
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p /tmp/etcd && dpkg -x .whl/etcd-server_*.deb /tmp/etcd
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/etcd/usr/bin:$PATH
exec "$@"
