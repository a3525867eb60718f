#!/usr/bin/env bash
# Build (or find cached) the GPU image here: `scalelab container build --gpu`, after a
# free-disk check. Cached by input hash under ${SCALELAB_CACHE:-~/.cache/scalelab}/images/
# (a second run with the same inputs reuses every stage).
#
#   tools/build_gpu_image.sh [OUT.sif] [extra `scalelab container build` flags]
#
# Cold: about 3 GB of wheels, a 6 GB venv (three times while the last stage copies it), Horovod's
# CUDA build, mksquashfs: about 24 GB free (the stages measured 2.9 + 5.5 + 5.9 + 5.9 (the last
# stage's copy) + 3.2 GB = 23.4 GB). Hosts that run the image need driver R580+.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/scalelab-gpu.sif}"
shift || true
cache="${SCALELAB_CACHE:-$HOME/.cache/scalelab}"
need_gb="${SCALELAB_GPU_BUILD_MIN_GB:-24}"
mkdir -p "$cache/images"
free_gb=$(( $(df -Pk "$cache/images" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
scalelab="${SCALELAB:-$here/.venv/bin/scalelab}"
[ -x "$scalelab" ] || scalelab="$(command -v scalelab)" || {
  echo "build_gpu_image.sh: error: scalelab not found (./setup.sh first)" >&2; exit 2; }
plan="$("$scalelab" container build --gpu --dry-run --image "$out" --force)"
echo "$plan"
if ! grep -q "(cached)" <<< "$plan" && [ "$free_gb" -lt "$need_gb" ]; then
  echo "build_gpu_image.sh: error: $free_gb GB free under $cache/images; the cold GPU build needs about $need_gb GB" >&2
  exit 2
fi
echo "disk: $free_gb GB free under $cache/images (need about $need_gb GB cold)"
start=$(date +%s)
"$scalelab" container build --gpu --image "$out" --force "$@"
echo "build_gpu_image.sh: $(( $(date +%s) - start )) s; $(du -h "$out" | cut -f1) $out"
