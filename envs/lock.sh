#!/usr/bin/env bash
# Regenerate the hashed environment locks from envs/requirements.txt with uv (pinned there):
#   envs/lock-pypi.txt  torch 2.13.0 as PyPI serves it (on Linux the CUDA build, which runs on
#                       CPUs too) + the stack: ONE universal lock for Python 3.11 to 3.14 on
#                       x86_64 and aarch64 (`uv pip compile --universal`); what setup.sh installs
#                       wherever the CPU build of torch is not at hand
#   envs/lock-cuda-build.txt  the CUDA 13.0 build tools (nvcc, crt, nvvm, cccl, nvtx, runtime) from
#                       PyPI that compile Horovod's NCCL operations in the GPU image, x86_64
#   envs/lock-cpu.txt   torch 2.13.0+cpu (the CPU build, ~190 MB instead of ~4 GB) + the stack,
#                       for Python 3.11 on x86_64: the build whose wheel these machines hold, so
#                       its hash can be taken here (PyTorch's CPU index is not reachable from them)
# Every line carries the sha256 of each file pip may pick (`pip install --require-hashes`).
# Horovod is not on either list: it is built locally from its sdist, pinned by hash in
# envs/lock-horovod.txt (see envs/build_horovod.sh).
#
# The CPU build of torch is not on PyPI: give where it lies with UV_FIND_LINKS (a wheel
# directory) or UV_EXTRA_INDEX_URL (PyTorch's CPU index); PIP_FIND_LINKS is used when set.
# Usage: envs/lock.sh [cpu|pypi|cuda-build ...]   (default: cpu and pypi)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
uv="${UV:-$here/../.venv/bin/uv}"
[ -x "$uv" ] || { echo "envs/lock.sh: error: $uv not found (pip install uv, pinned in envs/requirements.txt)" >&2; exit 2; }
export SSL_CERT_FILE="${SSL_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then
  export UV_FIND_LINKS="$PIP_FIND_LINKS"
fi
variants=("$@")
[ "${#variants[@]}" -gt 0 ] || variants=(cpu pypi)
for v in "${variants[@]}"; do
  case "$v" in
    # The PyPI lock must not see a local CPU wheel dir: PyPI's torch is the one it pins.
    pypi) target=(--universal --python-version 3.11); unset_links=(-u UV_FIND_LINKS -u UV_EXTRA_INDEX_URL) ;;
    cpu) target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28); unset_links=() ;;
    cuda-build) target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28); unset_links=(-u UV_FIND_LINKS -u UV_EXTRA_INDEX_URL) ;;
    *) echo "envs/lock.sh: error: unknown variant $v (cpu|pypi|cuda-build)" >&2; exit 2 ;;
  esac
  echo "==> envs/lock-$v.txt"
  # Start from the current lock: uv keeps its versions where they still satisfy the inputs,
  # so adding one package does not move every transitive pin.
  [ -f "$here/lock-$v.txt" ] && cp "$here/lock-$v.txt" "$here/lock-$v.txt.tmp.$$"
  (cd "$here" && env "${unset_links[@]}" "$uv" pip compile "lock-$v.in" --generate-hashes --quiet \
     "${target[@]}" --custom-compile-command "envs/lock.sh $v" \
     --output-file "lock-$v.txt.tmp.$$")
  mv "$here/lock-$v.txt.tmp.$$" "$here/lock-$v.txt"
done
