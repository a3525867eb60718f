#!/usr/bin/env bash
# Regenerate the hashed environment locks from envs/requirements.txt with uv (pinned there):
#   envs/lock-cpu.txt   torch 2.13.0+cpu (the CPU build) + the stack; what setup.sh and CI install
#   envs/lock-cuda.txt  torch 2.13.0 as PyPI serves it on Linux x86_64: the CUDA build
# Every line carries the sha256 of each file pip may pick (`pip install --require-hashes`).
# Horovod is not on either list: it is built locally from its sdist, pinned by hash in
# envs/lock-horovod.txt (see envs/build_horovod.sh).
#
# The CPU build of torch is not on PyPI: give where it lies with UV_FIND_LINKS (a wheel
# directory) or UV_EXTRA_INDEX_URL (PyTorch's CPU index); PIP_FIND_LINKS is used when set.
# Usage: envs/lock.sh [cpu|cuda ...]   (default: both)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
uv="${UV:-$here/../.venv/bin/uv}"
[ -x "$uv" ] || { echo "envs/lock.sh: error: $uv not found (pip install uv, pinned in envs/requirements.txt)" >&2; exit 2; }
export SSL_CERT_FILE="${SSL_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then
  export UV_FIND_LINKS="$PIP_FIND_LINKS"
fi
variants=("$@")
[ "${#variants[@]}" -gt 0 ] || variants=(cpu cuda)
for v in "${variants[@]}"; do
  case "$v" in cpu|cuda) ;; *) echo "envs/lock.sh: error: unknown variant $v (cpu|cuda)" >&2; exit 2 ;; esac
  unset_links=()
  # The CUDA lock must not see a local CPU wheel dir: PyPI's torch is the one it pins.
  [ "$v" = cuda ] && unset_links=(-u UV_FIND_LINKS -u UV_EXTRA_INDEX_URL)
  echo "==> envs/lock-$v.txt"
  (cd "$here" && env "${unset_links[@]}" "$uv" pip compile "lock-$v.in" --generate-hashes --quiet \
     --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
     --custom-compile-command "envs/lock.sh $v" \
     --output-file "lock-$v.txt.tmp.$$")
  mv "$here/lock-$v.txt.tmp.$$" "$here/lock-$v.txt"
done
