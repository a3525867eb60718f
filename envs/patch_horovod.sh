#!/usr/bin/env bash
# Patch an unpacked Horovod 0.28.1 sdist so it builds and runs with today's stack.
#
#   envs/patch_horovod.sh [--libcuda] [--cpu-only] SRC_DIR
#
# Always: C++17. Horovod's CMake asks for C++14 in CMakeLists.txt and
#   horovod/torch/CMakeLists.txt; torch >= 2.1 headers need C++17. (The CPU build,
#   envs/build_horovod.sh, applies exactly this and nothing else.)
# --libcuda (GPU builds): horovod/torch/cuda_util.cc (and the MXNet copy) open the
#   CUDA driver with dlopen("libcuda.so"). That unversioned name is a development
#   symlink: `apptainer exec --nv` and most driver installs provide libcuda.so.1
#   only, so the first GPU collective would fail. The patch opens "libcuda.so.1",
#   the driver's soname.
# --cpu-only (a CUDA build of torch, Horovod's CPU operations): Horovod's FindPytorch calls a
#   torch "CUDA" as soon as torch.version.cuda is set and torch finds any CUDA_HOME, and then
#   requires a complete CUDA toolkit (headers and cudart) even though no GPU operation is
#   built. PyPI's torch is such a build, and a machine may carry an nvcc without the rest:
#   the build failed. The patch makes FindPytorch report no CUDA when
#   HOROVOD_TORCH_CPU_ONLY=1 is in the build's environment (envs/build_horovod.sh sets it).
#
# Each patch checks that the text it replaces is there first and that the result
# is what it should be: on a source tree where a patch no longer applies (another
# Horovod release, a tree patched twice) the script stops with an error naming the
# file, instead of building something unpatched.
set -euo pipefail

libcuda=0
cpu_only=0
while [ $# -gt 1 ]; do
  case "$1" in
    --libcuda) libcuda=1; shift ;;
    --cpu-only) cpu_only=1; shift ;;
    *) echo "patch_horovod.sh: error: unknown option $1" >&2; exit 2 ;;
  esac
done
src="${1:?usage: patch_horovod.sh [--libcuda] [--cpu-only] SRC_DIR}"
[ -d "$src" ] || { echo "patch_horovod.sh: error: $src is not a directory" >&2; exit 2; }

fail() { echo "patch_horovod.sh: error: $*" >&2; exit 1; }

# C++17 (the same edit envs/build_horovod.sh always made).
for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
  grep -q 'CMAKE_CXX_STANDARD 14' "$f" || fail "$f has no C++14 line to patch"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
done

if [ "$libcuda" = 1 ]; then
  for f in "$src/horovod/torch/cuda_util.cc" "$src/horovod/mxnet/cuda_util.cc"; do
    [ -f "$f" ] || fail "$f not found: not the Horovod source layout this patch is for"
    grep -q 'dlopen("libcuda.so", RTLD_LAZY)' "$f" \
      || fail "$f has no dlopen(\"libcuda.so\", RTLD_LAZY) to patch"
    sed -i -e 's/dlopen("libcuda\.so", RTLD_LAZY)/dlopen("libcuda.so.1", RTLD_LAZY)/' \
           -e 's/Could not dlopen libcuda\.so\./Could not dlopen libcuda.so.1./' "$f"
  done
  # Nothing in the tree may still open the unversioned name.
  left="$(grep -rn --include='*.cc' --include='*.cpp' --include='*.h' --include='*.cu' \
            --include='*.py' '"libcuda\.so"' "$src" || true)"
  [ -z "$left" ] || fail "libcuda.so is still opened by its unversioned name: $left"
fi

if [ "$cpu_only" = 1 ]; then
  f="$src/cmake/Modules/FindPytorch.cmake"
  line='string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)'
  grep -qF "$line" "$f" || fail "$f has no '$line' to patch"
  sed -i "/string(TOUPPER \"\${Pytorch_CUDA}\" Pytorch_CUDA)/a if (\"\$ENV{HOROVOD_TORCH_CPU_ONLY}\" STREQUAL \"1\")\n    set(Pytorch_CUDA FALSE)\nendif()" "$f"
  grep -q 'HOROVOD_TORCH_CPU_ONLY' "$f" || fail "$f: the CPU-only patch did not apply"
fi
