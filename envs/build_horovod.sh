# Build (or reuse) a Horovod 0.28.1 wheel for the venv's torch and MPI, and install it.
#
# Why a build: PyPI has only the 0.28.1 sdist (2023); its CMake asks for C++14
# while torch >= 2.1 headers need C++17, so the stock build fails. We patch the
# two CMakeLists.txt files to C++17 and build with the PyTorch framework, the MPI
# and Gloo controllers, and Gloo CPU operations. NCCL GPU operations are built only
# when asked (SCALELAB_HOROVOD_GPU=1, or HOROVOD_GPU_OPERATIONS=NCCL in the environment)
# or when this machine has a GPU (nvidia-smi lists one) and NCCL (the venv's nvidia-nccl
# wheel or NCCL_HOME) next to a CUDA torch and nvcc: a CUDA torch alone (PyPI's build on a
# CPU-only machine) gets the CPU build. The wheel is cached outside the repository, keyed
# by the Horovod, torch, MPI and Python versions (and CUDA), so a second set-up does not rebuild.
#
# Usage: envs/build_horovod.sh VENV_DIR
#        envs/build_horovod.sh --check VENV_DIR   print what the build lacks (C++ compiler,
#                                                 cmake, Python headers), nothing when ready
#        envs/build_horovod.sh --cache-key TORCH OMPI PY_TAG DEVICE   the cache entry's name
# Env:   SCALELAB_CACHE (default ~/.cache/scalelab), HOROVOD_VERSION (default 0.28.1),
#        SCALELAB_HOROVOD_GPU=1 (build NCCL GPU operations)
set -euo pipefail

hvd_version="${HOROVOD_VERSION:-0.28.1}"
cache_root="${SCALELAB_CACHE:-$HOME/.cache/scalelab}"
# The wheel cache's directory name: its one definition (the CPU image build asks for it with
# --cache-key). "relocatable": the wheel finds the venv's libraries relative to itself (see
# the runpath below), so a wheel built for one venv serves any venv with the same torch, MPI
# and Python.
cache_key() {  # TORCH_VERSION OMPI_VERSION PY_TAG DEVICE
  echo "horovod${hvd_version}-relocatable-torch$1-ompi$2-$3-$4"
}
if [ "${1:-}" = --cache-key ]; then
  [ $# -eq 5 ] || { echo "usage: build_horovod.sh --cache-key TORCH OMPI PY_TAG DEVICE" >&2; exit 2; }
  cache_key "$2" "$3" "$4" "$5"
  exit 0
fi

check_only=0
if [ "${1:-}" = --check ]; then check_only=1; shift; fi
venv="$(cd "${1:?usage: build_horovod.sh [--check] VENV_DIR}" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$venv/bin/python"

# What the build needs from the machine; each is named with its non-root ways to get it.
missing_prereqs() {
  local out=()
  local cxx="" c
  for c in ${CXX:-c++ g++ clang++}; do
    # command -v alone may name a file that is not executable: test it.
    c="$(command -v "$c" 2>/dev/null || true)"
    if [ -n "$c" ] && [ -x "$c" ]; then cxx="$c"; break; fi
  done
  [ -n "$cxx" ] ||
    out+=("no C++ compiler (module load gcc, or the build-essential/gcc-c++ package)")
  PATH="$venv/bin:$PATH" command -v cmake >/dev/null 2>&1 ||
    out+=("no cmake (module load cmake, or $venv/bin/pip install cmake)")
  "$py" -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    out+=("no Python headers (Python.h; the python3-dev/python3-devel package, or a Python from the site's module, pyenv or uv, which carry them)")
  local IFS=";"
  echo "${out[*]}"
}
if [ "$check_only" = 1 ]; then
  missing_prereqs
  exit 0
fi
lacking="$(missing_prereqs)"
[ -z "$lacking" ] || { echo "error: Horovod cannot be built here: $lacking" >&2; exit 1; }

torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
cuda_version="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
mpi_version="$(PATH="$venv/bin:$PATH" mpirun --version | head -n1 | awk '{print $NF}')"
py_tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
# NCCL GPU operations: asked for, or a GPU and NCCL found beside a CUDA torch and nvcc.
has_gpu_and_nccl() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || return 1
  [ -n "${NCCL_HOME:-}" ] && return 0
  "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("nvidia.nccl") is None)' 2>/dev/null
}
device="cpu"
if [ -n "$cuda_version" ] && command -v nvcc >/dev/null 2>&1; then
  if [ "${SCALELAB_HOROVOD_GPU:-0}" = 1 ] || [ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ] || has_gpu_and_nccl; then
    device="cuda${cuda_version}"
  fi
fi
key="$(cache_key "$torch_version" "$mpi_version" "$py_tag" "$device")"
cache_dir="$cache_root/wheels/$key"

if "$py" -c "import horovod, horovod.torch, sys; sys.exit(horovod.__version__ != '$hvd_version')" 2>/dev/null; then
  echo "horovod $hvd_version already installed in $venv"
  exit 0
fi

if ! ls "$cache_dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "building Horovod $hvd_version ($key); about 5 minutes on 2 cores"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  if grep -q "^horovod==$hvd_version " "$here/lock-horovod.txt"; then
    # The pinned sdist, checked against its sha256 (envs/lock-horovod.txt).
    "$py" -m pip download --quiet --no-deps --no-binary :all: --require-hashes --dest "$work" \
      -r "$here/lock-horovod.txt"
  else
    echo "warning: horovod $hvd_version is not pinned by hash in envs/lock-horovod.txt" >&2
    "$py" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "horovod==$hvd_version"
  fi
  tar -xzf "$work/horovod-$hvd_version.tar.gz" -C "$work"
  src="$work/horovod-$hvd_version"
  # C++14 -> C++17 in the two CMakeLists.txt (the shared patch script; no --libcuda here:
  # the CPU build compiles no CUDA code, and its wheel cache key stays as it was).
  patch_args=()
  # A CUDA torch with Horovod's CPU operations: build no CUDA code (see patch_horovod.sh).
  if [ "$device" = cpu ] && [ -n "$cuda_version" ]; then
    patch_args=(--cpu-only)
    export HOROVOD_TORCH_CPU_ONLY=1
  fi
  bash "$here/patch_horovod.sh" "${patch_args[@]}" "$src"
  # A relocatable runpath. CMake's default writes the absolute directories it linked
  # against (this venv's lib/ and torch/lib) into mpi_lib_v2.so, so the cached wheel
  # installed into another venv (another checkout, another user, the venv seen from
  # another path on a compute node) loads libmpi from the building venv, or fails with
  # "libmpi.so.40: cannot open shared object file" once that venv is gone. Directories
  # inside the venv become $ORIGIN-relative; MPI or NCCL from outside it stay absolute.
  runpath="$("$py" - "$venv" "$device" "$(PATH="$venv/bin:$PATH" mpicc --showme:libdirs)" <<'PY'
import os, sys, sysconfig
venv, device, mpi_dirs = sys.argv[1], sys.argv[2], sys.argv[3].split()
site = sysconfig.get_paths()["purelib"]
ext_dir = os.path.join(site, "horovod", "torch")  # where mpi_lib_v2.so is installed
dirs = [os.path.join(site, "torch", "lib"), *mpi_dirs]
if device != "cpu":
    dirs.append(os.environ.get("NCCL_HOME") and os.path.join(os.environ["NCCL_HOME"], "lib")
                or os.path.join(site, "nvidia", "nccl", "lib"))
def entry(d: str) -> str:
    d = os.path.realpath(d)
    inside = os.path.commonpath([d, os.path.realpath(venv)]) == os.path.realpath(venv)
    return "$ORIGIN/" + os.path.relpath(d, os.path.realpath(ext_dir)) if inside else d
print(";".join(dict.fromkeys(entry(d) for d in dirs)))
PY
)"
  grep -q '^project(horovod CXX)$' "$src/CMakeLists.txt" ||
    { echo "error: $src/CMakeLists.txt has no project(horovod CXX) line" >&2; exit 1; }
  sed -i '/^project(horovod CXX)$/a set(CMAKE_BUILD_WITH_INSTALL_RPATH TRUE)\nset(CMAKE_INSTALL_RPATH "$ENV{SCALELAB_HOROVOD_RUNPATH}")' \
    "$src/CMakeLists.txt"
  export SCALELAB_HOROVOD_RUNPATH="$runpath"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO
  if [ "$device" != cpu ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
  else
    # A CUDA torch with nvcc on PATH would make Horovod's CMake look for CUDA and NCCL.
    unset HOROVOD_GPU HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_BROADCAST
  fi
  export MAKEFLAGS="-j$(nproc)"
  mkdir -p "$work/dist"
  PATH="$venv/bin:$PATH" "$py" -m pip wheel --no-build-isolation --no-deps \
    --wheel-dir "$work/dist" "$src" > "$work/build.log" 2>&1 || {
      echo "error: Horovod build failed; last lines of the log:" >&2
      tail -n 40 "$work/build.log" >&2
      exit 1
    }
  mkdir -p "$cache_dir.tmp.$$"
  cp "$work"/dist/horovod-*.whl "$cache_dir.tmp.$$/"
  rm -rf "$cache_dir"
  mv "$cache_dir.tmp.$$" "$cache_dir"   # atomic: a half-copied wheel never looks cached
else
  echo "using cached Horovod wheel $cache_dir"
fi
"$py" -m pip install --quiet --no-deps "$cache_dir"/horovod-*.whl
# Horovod's runtime dependencies, pinned in envs/requirements.txt (cloudpickle, psutil, pyyaml, packaging).
"$py" -c 'import horovod, horovod.torch as hvd; print("horovod", horovod.__version__, "mpi", hvd.mpi_built(), "gloo", hvd.gloo_built(), "nccl", hvd.nccl_built())'
