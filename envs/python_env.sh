# The pinned Python stack in a venv, hash-checked: the one definition of the checks and of
# the lock choice, shared by the checkout's ./setup.sh and a study bundle's setup.sh (which
# ships this file in its envs/).
#   1. up-front checks, one line each, before any download: Python 3.11 to 3.14, a way to make
#      a venv, free disk space, and where pip can find torch (a stopping check exits 2 and
#      names the fix; a venv this script created is removed again),
#   2. envs/lock-cpu.txt where the CPU build of torch is at hand (a local wheel directory, or
#      PyTorch's CPU index in pip's sources or named with --torch-index; Python 3.11 on
#      x86_64), otherwise envs/lock-pypi.txt (PyPI's torch, the CUDA build, which runs on CPUs
#      too), installed with --require-hashes; a copy of the lock lies in VENV/scalelab-lock.txt
#      once the install is complete.
# Rerunning it after an interruption reuses the venv and lets pip finish the install.
#
# Usage: bash envs/python_env.sh VENV [--torch-index URL]
# Env:   PYTHON (default python3), SCALELAB_LOCK=cpu|pypi (default: chosen by what pip can
#        reach), SETUP_NAME (the caller's name in messages, default setup.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${SETUP_NAME:-setup.sh}"
die() { echo "$name: error: $*" >&2; exit 2; }
venv="${1:?usage: python_env.sh VENV [--torch-index URL]}"
shift
torch_index=""
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-index) [ $# -ge 2 ] || die "--torch-index needs a URL"; torch_index="$2"; shift ;;
    *) die "python_env.sh: unknown option $1" ;;
  esac
  shift
done
torch_version=2.13.0
python="${PYTHON:-python3}"
vpy="$venv/bin/python"

command -v "$python" >/dev/null 2>&1 || die "no Python interpreter '$python'; name one with PYTHON=/path/to/python3.12 ./$name (the site's python module, pyenv, or 'uv python install 3.12')"
py_ver="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
py_minor="$("$python" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)')"
if [ "$py_minor" -lt 11 ] || [ "$py_minor" -gt 14 ]; then
  die "Python $py_ver ($python) is not supported: scalelab needs 3.11 to 3.14; name another with PYTHON=/path/to/python3.12 ./$name (the site's python module, pyenv, or 'uv python install 3.12')"
fi
echo "==> check: Python $py_ver ($(command -v "$python"))"

make_venv=()
if [ -x "$vpy" ]; then
  echo "==> check: $venv exists ($("$vpy" --version 2>&1))"
elif "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  make_venv=("$python" -m venv "$venv")
  echo "==> check: venv available ($python -m venv)"
elif command -v uv >/dev/null 2>&1; then
  make_venv=(uv venv --seed --python "$python" "$venv")
  echo "==> check: venv available (uv venv; this Python has no ensurepip)"
else
  die "Python $py_ver has no venv module (ensurepip is missing): with root, install python3.$py_minor-venv (Debian/Ubuntu); without root, 'python3 -m pip install --user uv' (or the site's uv module) and rerun: setup then uses 'uv venv'"
fi

# Free space on the venv's file system: the CPU build needs about 3 GB, PyPI's CUDA build about
# 10 GB (4 GB of downloads, cached by pip, and 6 GB unpacked in the venv).
cpu_lock_fits=0
machine="$(uname -m)"
[ "$py_minor" = 11 ] && [ "$machine" = x86_64 ] && cpu_lock_fits=1
need_gb=3
{ [ "${SCALELAB_LOCK:-}" = pypi ] || [ "$cpu_lock_fits" = 0 ]; } && need_gb=10
parent="$(dirname "$venv")"
mkdir -p "$parent"
free_kb="$(df -Pk "$parent" | awk 'NR==2 {print $4}')"
free_gb=$((free_kb / 1024 / 1024))
if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  die "only $((free_kb / 1024)) MB free in $(cd "$parent" && pwd) (df): the environment needs about $need_gb GB; free some space or set up on a larger file system (a project or scratch directory)"
fi
echo "==> check: ${free_gb} GB free in $(cd "$parent" && pwd) (about $need_gb GB needed)"

# Where pip can find torch decides the lock; pip itself answers, with the sources it reads
# (its config, PIP_* variables, --torch-index). Only metadata is fetched (--dry-run).
created_venv=0
if [ "${#make_venv[@]}" -gt 0 ]; then
  "${make_venv[@]}" >/dev/null || die "could not create $venv with: ${make_venv[*]}"
  created_venv=1
fi
pip_src=()
[ -n "$torch_index" ] && pip_src=(--extra-index-url "$torch_index")
abandon() {  # a stopping check after the venv was made: leave nothing half-installed
  [ "$created_venv" = 1 ] && rm -rf "$venv"
  die "$@"
}
pip_finds() {  # pip_finds REQUIREMENT -> 0 when pip resolves it from its sources
  "$vpy" -m pip install --dry-run --no-deps --ignore-installed --quiet \
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
lock="$here/lock-$lock_variant.txt"
if [ "$lock_variant" = cpu ]; then
  echo "==> check: torch $torch_version+cpu found (the CPU build, about 190 MB): envs/lock-cpu.txt"
else
  reason="the CPU build's lock covers Python 3.11 on x86_64 only"
  [ "$cpu_lock_fits" = 1 ] && reason="the CPU build is not in pip's sources (a wheel directory, or PyTorch's CPU index: --torch-index URL)"
  echo "==> check: torch $torch_version from PyPI: the CUDA build (runs on CPUs too), about 4 GB to download, since $reason: envs/lock-pypi.txt"
fi

echo "==> installing the locked Python stack (envs/lock-$lock_variant.txt, hash-checked)"
rm -f "$venv/scalelab-lock.txt"  # present only once an install completed
"$vpy" -m pip install --quiet --upgrade pip
"$vpy" -m pip install --quiet "${pip_src[@]}" --require-hashes -r "$lock"
cp "$lock" "$venv/scalelab-lock.txt.tmp"
mv "$venv/scalelab-lock.txt.tmp" "$venv/scalelab-lock.txt"
