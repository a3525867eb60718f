#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a working scalelab:
#   1. system packages (Slurm, munge, PMIx for the test cluster; compilers for Horovod),
#   2. the pinned Python stack in .venv (envs/requirements.txt),
#   3. Horovod 0.28.1 built for it (cached wheel, see envs/build_horovod.sh),
#   4. scalelab itself (editable), then
#   5. the main job: the Snakemake workflow on the embedded default config, locally.
# Usage: ./setup.sh [--no-run]      (--no-run stops after step 4; CI uses it)
set -euo pipefail
cd "$(dirname "$0")"
run_main=1
[ "${1:-}" = "--no-run" ] && run_main=0

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
echo "==> installing the pinned Python stack (envs/requirements.txt)"
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet -r envs/requirements.txt
echo "==> Horovod"
bash envs/build_horovod.sh .venv
echo "==> scalelab"
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/scalelab doctor --mode local

if [ "$run_main" = 1 ]; then
  echo "==> main job: snakemake on config/config.yaml (local)"
  .venv/bin/snakemake --cores all
  .venv/bin/snakemake --report results/report.html
  echo "==> done: results/ holds runs, evaluations, analysis and report.html;"
  echo "    run the tests with: .venv/bin/python -m pytest"
fi
