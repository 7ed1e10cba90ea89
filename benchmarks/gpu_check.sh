#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): bf16 vs fp32 scoring (|Δnll|, τ=2.5 mask flips), scoring and training
# tokens/s and MFU, vLLM vs HF scoring when vllm is installed, and `pytest -m gpu`. Summary in benchmarks/results/gpu/.
#
#   bash scripts/setup.sh && bash benchmarks/gpu_check.sh          # on a CUDA machine (H100 / H200 / A100 peaks known)
#   bash benchmarks/gpu_check.sh --dry-run                          # on a CPU: checks the script, measures nothing
#
# Other flags go to gpu_check.py (--help). PY picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 FORGETLESS_PROGRESS=0 TOKENIZERS_PARALLELISM=false
if [[ " $* " != *" --dry-run "* ]]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: $PY sees no CUDA device (torch.cuda.is_available() is false); --dry-run checks the script on a CPU" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$PY" benchmarks/gpu_check.py "$@"
