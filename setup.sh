#!/usr/bin/env bash
# One command from a fresh Linux machine (a laptop, a workstation or a cluster login node; no
# root needed) to a working scalelab:
#   1. up-front checks, one line each, before any download: Python 3.11 to 3.14, a way to make
#      a venv, free disk space, and where pip can find torch 2.13.0 (a stopping check exits 2
#      and names the fix; nothing is left half-installed),
#   2. the pinned Python stack in .venv, hash-checked: envs/lock-cpu.txt where the CPU build of
#      torch is at hand (a local wheel directory, or PyTorch's CPU index in pip's sources or
#      named with --torch-index; Python 3.11 on x86_64), otherwise envs/lock-pypi.txt (PyPI's
#      torch, the CUDA build, which runs on CPUs too: about 4 GB; Python 3.11-3.14, x86_64 and
#      aarch64); steps 1 and 2 are envs/python_env.sh, which a study bundle's setup.sh
#      runs too,
#   3. Horovod 0.28.1 built for it (cached wheel, see envs/build_horovod.sh) where a C++
#      compiler, cmake and the Python headers are found; otherwise one warning and no Horovod
#      (DDP and FSDP work; Horovod then runs in the container image),
#   4. scalelab itself (editable), then
#   5. the main job: the Snakemake workflow on the embedded default config, locally.
# System packages are never installed for that: only with --test-env (the Slurm test cluster,
# Apptainer and a headless browser for the test suite; with sudo when not root).
#
# Usage: ./setup.sh [--no-run] [--test-env] [--torch-index URL] [--no-horovod]
#   --no-run            stop after step 4 (CI uses it)
#   --test-env          also install what only the test suite needs (envs/test_env.sh)
#   --torch-index URL   a PyTorch CPU index (e.g. PyTorch's /whl/cpu) pip may read for torch
#   --no-horovod        do not build Horovod
# Env: PYTHON (the interpreter, default python3), SCALELAB_LOCK=cpu|pypi (default: chosen by
#      what pip can reach), SCALELAB_CACHE (Horovod wheel cache, default ~/.cache/scalelab).
set -euo pipefail
cd "$(dirname "$0")"
run_main=1
test_env=0
horovod=1
torch_index=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-run) run_main=0 ;;
    --test-env) test_env=1 ;;
    --no-horovod) horovod=0 ;;
    --torch-index) [ $# -ge 2 ] || { echo "setup.sh: error: --torch-index needs a URL" >&2; exit 2; }
                   torch_index="$2"; shift ;;
    --torch-index=*) torch_index="${1#*=}" ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "setup.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# -- 1.-2. Up-front checks, then the locked Python stack ---------------------------------------
# envs/python_env.sh owns both (a study bundle's setup.sh runs the same file).
env_args=()
[ -n "$torch_index" ] && env_args=(--torch-index "$torch_index")
SETUP_NAME=setup.sh bash envs/python_env.sh .venv "${env_args[@]}"

# The test suite's system tools (only on request) come before Horovod: they include what
# builds it.
if [ "$test_env" = 1 ]; then
  echo "==> test environment (envs/test_env.sh)"
  bash envs/test_env.sh
fi

# -- 3. Horovod --------------------------------------------------------------------------------
doctor_args=(--mode local)
if [ "$horovod" = 1 ]; then
  missing="$(bash envs/build_horovod.sh --check .venv || true)"
  if [ -n "$missing" ]; then
    echo "setup.sh: warning: Horovod not built: $missing; DDP and FSDP work, and Horovod runs in the container image (docs/containers.md)" >&2
    horovod=0
  else
    echo "==> Horovod"
    bash envs/build_horovod.sh .venv
  fi
fi
[ "$horovod" = 1 ] || doctor_args+=(--without horovod)

# -- 4. scalelab -------------------------------------------------------------------------------
echo "==> scalelab"
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/scalelab doctor "${doctor_args[@]}"

# -- 5. The main job ---------------------------------------------------------------------------
if [ "$run_main" = 1 ]; then
  sm_args=(--cores all)
  if [ "$horovod" = 0 ]; then
    echo "==> Horovod is not built: the main job runs its DDP points only"
    sm_args+=(--config "sweep={backends: [ddp]}" "commbench={libs: [torch, mpi4py]}")
  fi
  echo "==> main job: snakemake on config/config.yaml (local)"
  .venv/bin/snakemake "${sm_args[@]}"
  .venv/bin/snakemake --report results/report.html
  echo "==> done: results/ holds runs, evaluations, analysis and report.html;"
  echo "    run the tests with: bash .ci/run (or .venv/bin/python -m pytest)"
fi
