#!/usr/bin/env bash
# Every benchmark of benchmarks/README.md in one run, on this machine, into one log:
#   bash benchmarks/run_all.sh cpu  [LOG]     # the CPU rows (host slabs, TCP Transfer Engine)
#   bash benchmarks/run_all.sh gpu  [LOG]     # GPU rows (one or two GPUs; NVLink rows need two)
#   (gpu-shapes / gpu-cluster: the two halves of gpu, for machines lent in 10-minute calls)
#   bash benchmarks/run_all.sh gpu-calls [LOG] / gpu-engines [LOG]   # issue 19/20/22 rows, one GPU:
#   fingerprints, tensord load, same-GPU get / RL step, fresh processes, publications read from
#   another daemon (two daemons on one GPU over nvlink_intra), host slabs at the pinned rate,
#   engine-style processes mounting an engine set
# Uses .venv/bin/python when it exists, else python3. The figures in README.md and
# benchmarks/README.md are copied from such a log; its first lines name the machine.
set -uo pipefail
cd "$(dirname "$0")"
kind=${1:-cpu}
log=${2:-/tmp/tensord-bench-$kind.log}
py=../.venv/bin/python
[ -x "$py" ] || py=python3
export PYTHONUNBUFFERED=1
{
  echo "== tensord benchmarks ($kind), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "== $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, sys; print("== python", sys.version.split()[0], "torch", torch.__version__)'
  if [ "$kind" = gpu ] || [ "$kind" = gpu-shapes ]; then
    for n in 300 3000 12000 90000; do
      echo "== shapes.py --tensors $n --gb 17.7 --device cuda:0"
      timeout 600 "$py" shapes.py --tensors "$n" --gb 17.7 --device cuda:0 --runs 5
    done
  fi
  if [ "$kind" = gpu ] || [ "$kind" = gpu-cluster ]; then
    if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
      for n in 300 90000; do
        echo "== cluster.py nvlink_intra --tensors $n (two daemons, one per GPU)"
        timeout 600 "$py" cluster.py --protocol nvlink_intra --device cuda:0 --to cuda:1 --tensors "$n" --gib 16.5 --runs 5
      done
    fi
    echo "== ingest.py --device cuda:0 --gib 4"
    timeout 600 "$py" ingest.py --device cuda:0 --gib 4 --runs 3
    echo "== profile_ingest.py --device cuda:0 --gib 4 --threads 16 (warm: phases of one load)"
    timeout 300 "$py" profile_ingest.py --device cuda:0 --gib 4 --threads 16
  fi
  if [ "$kind" = gpu-calls ]; then
    echo "== fingerprint.py --device cuda:0 --tensors 90000 --gb 20"
    timeout 60 "$py" fingerprint.py --device cuda:0 --tensors 90000 --gb 20 --runs 3
    echo "== cli_load.py --device cuda:0 --gb 4 (tensord load as typed)"
    timeout 120 "$py" cli_load.py --device cuda:0 --gb 4 --tensors 900 --runs 3
    echo "== shapes.py --tensors 90000 --gb 20 --device cuda:0"
    timeout 90 "$py" shapes.py --tensors 90000 --gb 20 --device cuda:0 --runs 3
    echo "== cluster.py nvlink_intra --tensors 90000 --gib 8 (two daemons on one GPU)"
    timeout 120 "$py" cluster.py --protocol nvlink_intra --device cuda:0 --to cuda:0 --tensors 90000 --gib 8 --runs 3
  fi
  if [ "$kind" = gpu-engines ]; then
    echo "== rl_sync.py --device cuda:0 --tensors 90000 --gb 20"
    timeout 150 "$py" rl_sync.py --device cuda:0 --tensors 90000 --gb 20 --steps 6
    echo "== first_call.py --device cuda:0 --tensors 90000 --gb 20"
    timeout 120 "$py" first_call.py --device cuda:0 --tensors 90000 --gb 20 --runs 3
    echo "== publish_remote.py nvlink_intra --tensors 90000 --gib 20 (two daemons on one GPU)"
    timeout 150 "$py" publish_remote.py --protocol nvlink_intra --device cuda:0 --to cuda:0 --tensors 90000 --gib 20 --runs 3
    echo "== host_slabs.py --full --runs 1"
    timeout 120 "$py" host_slabs.py --full --runs 1 --skip-pageable-put
    echo "== mount_engine.py --device cuda:0 --tensors 90000 --gb 17.7 (engine-style processes that mount)"
    timeout 150 "$py" mount_engine.py --device cuda:0 --tensors 90000 --gb 17.7 --runs 3
  fi
  if [ "$kind" = cpu ]; then
    for n in 300 3000 12000 50000; do
      echo "== shapes.py --tensors $n --gb 0.5 (host slabs)"
      timeout 600 "$py" shapes.py --tensors "$n" --gb 0.5 --runs 5
    done
    echo "== cluster.py tcp --tensors 3000 (two daemons on loopback)"
    timeout 600 "$py" cluster.py --tensors 3000 --gib 0.25 --runs 3
    echo "== core.py (mount latency, LLM-shaped put/get/load_into)"
    timeout 600 "$py" core.py --runs 5
    echo "== ingest.py --gib 1.5 (host slabs)"
    timeout 600 "$py" ingest.py --gib 1.5 --runs 3
  fi
} 2>&1 | grep -v -E '^[IW][0-9]{4} |^WARNING: Logging before' | tee "$log"
