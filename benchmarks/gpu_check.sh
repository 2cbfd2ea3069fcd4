#!/usr/bin/env bash
# GPU check: bf16 quickstart, one 4-bit round, batched generation, aggregation and CKKS on CUDA tensors;
# prints a table (PASS/FAIL, seconds, key figure). Under 5 minutes on one CUDA GPU.
#
#   benchmarks/gpu_check.sh                 # needs a CUDA GPU, a CUDA build of torch and the gpu extra:
#                                           #   make setup TORCH="torch==2.13.0" && .venv/bin/pip install -c requirements.lock -e '.[gpu]'
#   benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with the tiny model (tests the script)
#   benchmarks/gpu_check.sh --only aggregation_cuda,ckks_cuda_tensors
#
# Exit status: 0 all passed, 1 a check failed, 2 no CUDA device (without --cpu-dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found: run \`make setup\` first (or set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [[ " $* " != *" --cpu-dry-run "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# 600 s hard stop: the checks take well under 5 minutes on one GPU; a hang must not hold the machine
exec timeout 600 "$PY" benchmarks/gpu_check.py "$@"
