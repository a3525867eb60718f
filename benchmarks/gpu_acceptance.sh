#!/usr/bin/env bash
# GPU acceptance for the machine the `device` tool lends (one GPU, its own Python 3.12 with
# torch 2.11 cu130 and mpi4py; no Horovod, no package registry). Runs the trainer with that
# machine's torch, from this checkout's src/ (no install), with scalelab's pure-Python
# dependencies the machine lacks (pydantic and its three helpers) carried as wheels in .whl/.
#
#   here, once:        bash benchmarks/gpu_acceptance.sh --prepare     # wheels -> .whl/
#   on the GPU:        bash benchmarks/gpu_acceptance.sh               # table on stdout
#   anywhere (CPU):    bash benchmarks/gpu_acceptance.sh --smoke       # every path, toy sizes
#
# Through the device tool: run(command="bash benchmarks/gpu_acceptance.sh", carry=[".whl"],
# timeout_s=420). Results go to stdout and, where $OUT is set, $OUT/gpu_acceptance.{md,json}.
# Budget: about 4-5 minutes on an H100/H200 (ResNet-50 compile is most of it), under the
# 6 minutes that leave room for a rerun in a 15-minute device budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        nvidia-ml-py==13.615.71)  # NVML: the energy counter

if [ "${1:-}" = "--prepare" ]; then
  # Wheels for CPython 3.12 on x86_64 Linux, fetched here where the registry is reachable.
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls .whl
  exit 0
fi

# Carried wheels first (the GPU machine), else whatever this Python already has.
if ! "$PY" -c 'import pydantic' 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_acceptance.sh: error: pydantic is missing and .whl/ holds no wheels: run" \
         "'bash benchmarks/gpu_acceptance.sh --prepare' where pip reaches PyPI, then carry .whl" >&2
    exit 2
  fi
  site="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader || true
args=("$@")
if [ -n "${OUT:-}" ]; then
  args+=(--json "$OUT/gpu_acceptance.json")
  "$PY" benchmarks/gpu_acceptance.py "${args[@]}" | tee "$OUT/gpu_acceptance.md"
else
  "$PY" benchmarks/gpu_acceptance.py "${args[@]}"
fi
