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

# Huge pages for host slabs (configs/tensord.toml, memory.huge_pages): let the kernel hand out up
# to 4 GiB of 2 MiB pages on demand, until reboot, if nothing is configured yet. Production hosts
# set this for good in /etc/sysctl.d (systemd/tensord-hugepages.conf). Without it tensord works,
# with slower loads into host memory, and the huge-page tests skip.
overcommit=/proc/sys/vm/nr_overcommit_hugepages
if [ -w "$overcommit" ] && [ "$(cat "$overcommit")" = 0 ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = 0 ]; then
  { echo 2048 > "$overcommit"; } 2>/dev/null \
    && echo "setup: vm.nr_overcommit_hugepages=2048 (huge pages for host slabs, until reboot)" || true
fi
