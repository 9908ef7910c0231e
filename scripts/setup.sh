#!/usr/bin/env bash
# Sets up everything tensord needs on a fresh Debian/Ubuntu machine, idempotently:
# system packages (etcd for the cluster tests; libibverbs/libnuma for the Mooncake CPU wheel)
# and a virtual environment in .venv with tensord installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
ldconfig -p | grep -q libibverbs.so.1 || need+=(libibverbs1)
ldconfig -p | grep -q libnuma.so.1 || need+=(libnuma1)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first, pinned: 2.13.0 is the CPU build this project's machines carry; on a GPU host,
# install the CUDA torch you use before running this and it is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[cpu,dev]"
