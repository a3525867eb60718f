#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a working scalelab:
#   1. system packages (Slurm, munge, PMIx for the test cluster; compilers for Horovod),
#   2. the pinned Python stack in .venv, hash-checked (envs/lock-cpu.txt; SCALELAB_LOCK=cuda
#      for envs/lock-cuda.txt),
#   3. Horovod 0.28.1 built for it (cached wheel, see envs/build_horovod.sh),
#   4. scalelab itself (editable), then
#   5. the main job: the Snakemake workflow on the embedded default config, locally.
# Usage: ./setup.sh [--no-run] [--test-env]
#   --no-run     stop after step 4 (CI uses it)
#   --test-env   also install what only the test suite needs (envs/test_env.sh: tools that
#                go into system paths, e.g. Apptainer and a headless browser); CI and
#                contributors ask for it, a user's machine never gets it unasked.
set -euo pipefail
cd "$(dirname "$0")"
run_main=1
test_env=0
for arg in "$@"; do
  case "$arg" in
    --no-run) run_main=0 ;;
    --test-env) test_env=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup.sh: error: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

apt_packages=(python3 python3-venv python3-dev build-essential cmake git
              slurm-wlm munge libpmix2 libpmix-dev iproute2 util-linux procps)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing system packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# The hashed lock of the stack (envs/lock.sh): every file pip installs is checked by sha256.
# CPU lock (default): torch 2.13.0+cpu, which pip finds only where that wheel is at hand (a local
# wheel directory or PyTorch's CPU index in pip's config). SCALELAB_LOCK=cuda: PyPI's torch
# 2.13.0, the CUDA build. Either way the lock goes into the venv for provenance.json.
lock="envs/lock-${SCALELAB_LOCK:-cpu}.txt"
[ -f "$lock" ] || { echo "setup.sh: error: SCALELAB_LOCK=${SCALELAB_LOCK}: no $lock (cpu|cuda)" >&2; exit 2; }
echo "==> installing the locked Python stack ($lock, hash-checked)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
cp "$lock" .venv/scalelab-lock.txt
echo "==> Horovod"
bash envs/build_horovod.sh .venv
echo "==> scalelab"
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/scalelab doctor --mode local
if [ "$test_env" = 1 ]; then
  echo "==> test environment (envs/test_env.sh)"
  bash envs/test_env.sh
fi

if [ "$run_main" = 1 ]; then
  echo "==> main job: snakemake on config/config.yaml (local)"
  .venv/bin/snakemake --cores all
  .venv/bin/snakemake --report results/report.html
  echo "==> done: results/ holds runs, evaluations, analysis and report.html;"
  echo "    run the tests with: .venv/bin/python -m pytest"
fi
