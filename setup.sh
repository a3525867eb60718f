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
#      aarch64),
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

die() { echo "setup.sh: error: $*" >&2; exit 2; }
torch_version=2.13.0
python="${PYTHON:-python3}"

# -- 1. Up-front checks ------------------------------------------------------------------------
command -v "$python" >/dev/null 2>&1 || die "no Python interpreter '$python'; name one with PYTHON=/path/to/python3.12 ./setup.sh (the site's python module, pyenv, or 'uv python install 3.12')"
py_ver="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
py_minor="$("$python" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)')"
if [ "$py_minor" -lt 11 ] || [ "$py_minor" -gt 14 ]; then
  die "Python $py_ver ($python) is not supported: scalelab needs 3.11 to 3.14; name another with PYTHON=/path/to/python3.12 ./setup.sh (the site's python module, pyenv, or 'uv python install 3.12')"
fi
echo "==> check: Python $py_ver ($(command -v "$python"))"

make_venv=()
if [ -x .venv/bin/python ]; then
  echo "==> check: .venv exists ($(.venv/bin/python --version 2>&1))"
elif "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  make_venv=("$python" -m venv .venv)
  echo "==> check: venv available ($python -m venv)"
elif command -v uv >/dev/null 2>&1; then
  make_venv=(uv venv --seed --python "$python" .venv)
  echo "==> check: venv available (uv venv; this Python has no ensurepip)"
else
  die "Python $py_ver has no venv module (ensurepip is missing): with root, install python3.$py_minor-venv (Debian/Ubuntu); without root, 'python3 -m pip install --user uv' (or the site's uv module) and rerun: setup then uses 'uv venv'"
fi

# Free space on the venv's file system: the CPU build needs about 3 GB, PyPI's CUDA build about
# 10 GB (4 GB of downloads, cached by pip, and 6 GB unpacked in .venv).
cpu_lock_fits=0
machine="$(uname -m)"
[ "$py_minor" = 11 ] && [ "$machine" = x86_64 ] && cpu_lock_fits=1
need_gb=3
{ [ "${SCALELAB_LOCK:-}" = pypi ] || [ "$cpu_lock_fits" = 0 ]; } && need_gb=10
free_kb="$(df -Pk . | awk 'NR==2 {print $4}')"
free_gb=$((free_kb / 1024 / 1024))
if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  die "only $((free_kb / 1024)) MB free in $(pwd) (df): the environment needs about $need_gb GB; free some space or clone scalelab onto a larger file system (a project or scratch directory)"
fi
echo "==> check: ${free_gb} GB free in $(pwd) (about $need_gb GB needed)"

# Where pip can find torch decides the lock; pip itself answers, with the sources it reads
# (its config, PIP_* variables, --torch-index). Only metadata is fetched (--dry-run).
created_venv=0
if [ "${#make_venv[@]}" -gt 0 ]; then
  "${make_venv[@]}" >/dev/null || die "could not create .venv with: ${make_venv[*]}"
  created_venv=1
fi
pip_src=()
[ -n "$torch_index" ] && pip_src=(--extra-index-url "$torch_index")
abandon() {  # a stopping check after .venv was made: leave nothing half-installed
  [ "$created_venv" = 1 ] && rm -rf .venv
  die "$@"
}
pip_finds() {  # pip_finds REQUIREMENT -> 0 when pip resolves it from its sources
  .venv/bin/python -m pip install --dry-run --no-deps --ignore-installed --quiet \
    --disable-pip-version-check "${pip_src[@]}" "$1" >/dev/null 2>"$probe_log"
}
probe_log="$(mktemp)"
trap 'rm -f "$probe_log"' EXIT
lock_variant="${SCALELAB_LOCK:-}"
case "$lock_variant" in
  "")
    if [ "$cpu_lock_fits" = 1 ] && pip_finds "torch==$torch_version+cpu"; then
      lock_variant=cpu
    elif pip_finds "torch==$torch_version"; then
      lock_variant=pypi
    else
      abandon "torch $torch_version cannot be found from the sources pip reads ($(tail -n 1 "$probe_log")); check the network or proxy (pip config list), or name an index with --torch-index URL"
    fi ;;
  cpu)
    [ "$cpu_lock_fits" = 1 ] || abandon "SCALELAB_LOCK=cpu: envs/lock-cpu.txt covers Python 3.11 on x86_64 only (this is Python $py_ver on $machine); use SCALELAB_LOCK=pypi"
    pip_finds "torch==$torch_version+cpu" || abandon "SCALELAB_LOCK=cpu: torch $torch_version+cpu cannot be found from the sources pip reads; name PyTorch's CPU index with --torch-index URL or put the wheel in a directory named by PIP_FIND_LINKS" ;;
  pypi)
    pip_finds "torch==$torch_version" || abandon "SCALELAB_LOCK=pypi: torch $torch_version cannot be found from the sources pip reads ($(tail -n 1 "$probe_log"))" ;;
  *) abandon "SCALELAB_LOCK=$lock_variant: no envs/lock-$lock_variant.txt (cpu|pypi)" ;;
esac
lock="envs/lock-$lock_variant.txt"
if [ "$lock_variant" = cpu ]; then
  echo "==> check: torch $torch_version+cpu found (the CPU build, about 190 MB): $lock"
else
  reason="the CPU build's lock covers Python 3.11 on x86_64 only"
  [ "$cpu_lock_fits" = 1 ] && reason="the CPU build is not in pip's sources (a wheel directory, or PyTorch's CPU index: --torch-index URL)"
  echo "==> check: torch $torch_version from PyPI: the CUDA build (runs on CPUs too), about 4 GB to download, since $reason: $lock"
fi

# The test suite's system tools (only on request) come first: they include what builds Horovod.
if [ "$test_env" = 1 ]; then
  echo "==> test environment (envs/test_env.sh)"
  bash envs/test_env.sh
fi

# -- 2. The locked Python stack ----------------------------------------------------------------
echo "==> installing the locked Python stack ($lock, hash-checked)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${pip_src[@]}" --require-hashes -r "$lock"
cp "$lock" .venv/scalelab-lock.txt

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
