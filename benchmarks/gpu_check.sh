#!/usr/bin/env bash
# GPU check of a built scalelab-gpu image, on ONE node with 2 or more NVIDIA GPUs and Apptainer,
# or (--two-nodes) across two nodes of a Slurm allocation.
#
#   benchmarks/gpu_check.sh [--dry-run] IMAGE.sif [OUT_DIR]
#   benchmarks/gpu_check.sh [--dry-run] --two-nodes IMAGE.sif [OUT_DIR]   (in a 2-node salloc)
#   benchmarks/gpu_check.sh --parse-transport NCCL_LOG   (prints IB, OFI, Socket or none,
#                                                         and GDRDMA when NCCL used it)
#
# What no CI machine can run (it needs GPUs and the host driver through --nv):
#   1. apptainer test --nv IMAGE: the image's own %test (ldd, one NCCL, libcuda.so.1 in
#      Horovod, MPI threads, one Horovod training step), now on a GPU;
#   2. the host environment cannot steer the image's MPI (needs no GPU, checked here too);
#   3. a 2-rank NCCL allreduce with torch DDP (torchrun inside the image);
#   4. a 2-rank NCCL allreduce with Horovod (the image's mpirun, NCCL operations);
#   and that DDP and Horovod report the same NCCL version: the image's one NCCL.
# --two-nodes runs one step instead: a 2-node NCCL allreduce (srun --mpi=pmix, one rank per
#   node, NCCL_DEBUG=INFO) that prints the transport NCCL chose between the nodes and FAILS
#   unless it is the expected one, so a fall-back to TCP sockets cannot pass silently:
#   SCALELAB_NCCL_TRANSPORT=IB (default; InfiniBand and RoCE), OFI (Slingshot, EFA: the
#   site's aws-ofi-nccl plugin, see docs/containers.md) or Socket (only where sockets are
#   really meant); SCALELAB_NCCL_GDRDMA=1 also requires GPUDirect RDMA (GDRDMA) on it.
#   A site plugin is bound with SCALELAB_APPTAINER_FLAGS (the --bind/--env flags that
#   `scalelab container exec --config ... --dry-run` prints for container.nccl_net_plugin).
# Each step prints the command it runs (`+ ...`), then PASS or FAIL. OUT_DIR (default
# ./gpu-check) gets every log and gpu_check.json (one record per step).
# Env: SCALELAB_APPTAINER (default: apptainer, else singularity),
#      SCALELAB_APPTAINER_FLAGS (extra `exec`/`test` flags, e.g. --userns).
# Exit: 0 all passed, 1 a check failed, 2 bad usage or fewer than 2 GPUs (or nodes).
set -uo pipefail

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
# The transport NCCL used between nodes, from its NCCL_DEBUG=INFO output: the channel lines
# ("Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0/GDRDMA"), else "Using network X".
# aws-ofi-nccl names itself Libfabric (AWS Libfabric in older releases): OFI.
nccl_transport() {
  local log="$1" net
  net="$(grep -o 'via NET/[^/]*' "$log" | sed 's|^via NET/||' | sort -u | head -n1)"
  [ -n "$net" ] || net="$(grep -o 'Using network .*' "$log" | sed 's/^Using network //' | sort -u | head -n1)"
  case "$net" in
    IB) echo -n IB ;;
    Socket) echo -n Socket ;;
    Libfabric|"AWS Libfabric"|OFI) echo -n OFI ;;
    "") echo -n none ;;
    *) echo -n "other:$net" ;;
  esac
  if grep -q 'via NET/[^ ]*/GDRDMA' "$log"; then echo " GDRDMA"; else echo; fi
}
if [ "${1:-}" = "--parse-transport" ]; then
  [ $# = 2 ] && [ -f "$2" ] || die "usage: benchmarks/gpu_check.sh --parse-transport NCCL_LOG"
  nccl_transport "$2"
  exit 0
fi

dry=0
two_nodes=0
while :; do
  case "${1:-}" in
    --dry-run) dry=1; shift ;;
    --two-nodes) two_nodes=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: benchmarks/gpu_check.sh [--dry-run] [--two-nodes] IMAGE.sif [OUT_DIR]"
image="$1"
out="${2:-gpu-check}"
expect_net="${SCALELAB_NCCL_TRANSPORT:-IB}"
case "$expect_net" in IB|OFI|Socket) ;; *) die "SCALELAB_NCCL_TRANSPORT=$expect_net: choose IB, OFI or Socket" ;; esac
expect_gdr="${SCALELAB_NCCL_GDRDMA:-0}"

runtime="${SCALELAB_APPTAINER:-}"
if [ -z "$runtime" ]; then
  runtime="$(command -v apptainer || command -v singularity || true)"
fi
read -r -a flags <<< "${SCALELAB_APPTAINER_FLAGS:-}"
if [ "$dry" = 0 ]; then
  [ -f "$image" ] || die "image not found: $image"
  [ -n "$runtime" ] && command -v "$runtime" >/dev/null || \
    die "no apptainer or singularity on PATH (set SCALELAB_APPTAINER)"
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs NVIDIA GPUs"
  gpus="$(nvidia-smi -L | grep -c '^GPU ')"
  if [ "$two_nodes" = 1 ]; then
    [ "$gpus" -ge 1 ] || die "found no GPU on this node"
    [ "${SLURM_JOB_NUM_NODES:-0}" -ge 2 ] || \
      die "--two-nodes runs inside a Slurm allocation of 2 or more nodes (salloc -N2 ...)"
  else
    [ "$gpus" -ge 2 ] || die "found $gpus GPU(s); the 2-rank NCCL checks need 2 on this node"
  fi
fi
runtime="${runtime:-apptainer}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# The two rank programs, written where the container sees them (OUT_DIR is bound).
cat > "$out/ddp_allreduce.py" <<'EOF'
"""2-rank NCCL allreduce and a DDP step with torch.distributed; one JSON line per rank."""
import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.full((1 << 22,), float(rank + 1), device="cuda")
dist.all_reduce(x)
# A DistributedDataParallel step: its gradient allreduce (NCCL) averages the ranks'.
model = torch.nn.Linear(256, 4, bias=False).cuda()
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
ddp(torch.full((8, 256), float(rank + 1), device="cuda")).sum().backward()
torch.cuda.synchronize()
expected = world * (world + 1) / 2
grad_ok = torch.allclose(model.weight.grad, torch.full_like(model.weight.grad, 8 * expected / world))
print(json.dumps({"check": "ddp", "rank": rank, "world": world, "value": x[0].item(),
                  "expected": expected, "grad_ok": bool(grad_ok),
                  "ok": bool(torch.all(x == expected)) and bool(grad_ok),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "gpu": torch.cuda.get_device_name(local)}), flush=True)
dist.destroy_process_group()
EOF
cat > "$out/horovod_allreduce.py" <<'EOF'
"""2-rank NCCL allreduce with Horovod (GPU tensors go through NCCL); one JSON line per rank."""
import json

import horovod.torch as hvd
import torch

hvd.init()
torch.cuda.set_device(hvd.local_rank())
x = torch.full((1 << 22,), float(hvd.rank() + 1), device="cuda")
y = hvd.allreduce(x, op=hvd.Sum)
torch.cuda.synchronize()
expected = hvd.size() * (hvd.size() + 1) / 2
print(json.dumps({"check": "horovod", "rank": hvd.rank(), "world": hvd.size(),
                  "value": y[0].item(), "expected": expected,
                  "ok": bool(torch.all(y == expected)), "nccl_built": bool(hvd.nccl_built()),
                  "mpi_threads": bool(hvd.mpi_threads_supported()),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version()))}), flush=True)
hvd.shutdown()
EOF

cat > "$out/nccl_two_nodes.py" <<'EOF'
"""One rank per node: a 256 MB NCCL allreduce between two nodes; one JSON line per rank."""
import json
import os
import socket

import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
local = int(os.environ.get("SLURM_LOCALID", "0"))
torch.cuda.set_device(local)
dist.init_process_group("nccl", rank=rank, world_size=world)
x = torch.full((1 << 26,), float(rank + 1), device="cuda")
dist.all_reduce(x)
torch.cuda.synchronize()
expected = world * (world + 1) / 2
print(json.dumps({"check": "two_nodes", "rank": rank, "world": world, "host": socket.gethostname(),
                  "value": x[0].item(), "expected": expected, "ok": bool(torch.all(x == expected)),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version()))}), flush=True)
dist.destroy_process_group()
EOF

results=()
failed=0
# step NAME CHECK_FN -- COMMAND...: print and run COMMAND (log in OUT_DIR/NAME.log), then
# CHECK_FN NAME decides PASS/FAIL from the exit status and the log.
step() {
  local name="$1" check="$2"; shift 3
  echo "+ $(printf '%q ' "$@")"
  [ "$dry" = 1 ] && return 0
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local verdict=FAIL
  if [ "$rc" = 0 ] && "$check" "$out/$name.log"; then verdict=PASS; else failed=1; fi
  echo "$verdict $name (exit $rc, log $out/$name.log)"
  results+=("{\"step\": \"$name\", \"exit\": $rc, \"result\": \"$verdict\"}")
}
ok_exit() { return 0; }
# Both ranks printed ok=true, and NCCL said which version it is.
ranks_ok() {
  [ "$(grep -c '"ok": true' "$1")" = 2 ] && ! grep -q '"ok": false' "$1" && \
    grep -q 'NCCL version' "$1"
}
env_ok() { grep -qx 'OPAL_PREFIX=/opt/scalelab/venv OMPI_MCA_pml=None threads=3 gds=ds12' "$1"; }

# Both ranks ok, on two hosts, over the expected transport (and GDRDMA where expected).
transport_ok() {
  local seen
  seen="$(nccl_transport "$1")"
  echo "NCCL transport between the nodes: $seen (expected $expect_net$([ "$expect_gdr" = 1 ] && echo ' GDRDMA'))"
  [ "$(grep -c '"ok": true' "$1")" = 2 ] && ! grep -q '"ok": false' "$1" || return 1
  [ "$(grep -o '"host": "[^"]*"' "$1" | sort -u | wc -l)" = 2 ] || return 1
  [ "${seen%% *}" = "$expect_net" ] || return 1
  [ "$expect_gdr" != 1 ] || [ "${seen#* }" = GDRDMA ]
}

if [ "$two_nodes" = 1 ]; then
  master="$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null || true) | head -n1)"
  step nccl_two_nodes transport_ok -- env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET \
    MASTER_ADDR="${master:-localhost}" MASTER_PORT="${SCALELAB_MASTER_PORT:-29533}" \
    srun --mpi=pmix --nodes=2 --ntasks=2 --ntasks-per-node=1 "$runtime" exec --nv \
    "${flags[@]}" --bind "$out" "$image" python "$out/nccl_two_nodes.py"
  [ "$dry" = 1 ] && exit 0
  { echo "["; (IFS=,; echo "${results[*]}"); echo "]"; } > "$out/gpu_check.json.tmp"
  mv "$out/gpu_check.json.tmp" "$out/gpu_check.json"
  echo "gpu_check: $([ "$failed" = 0 ] && echo 'all checks passed' || echo 'FAILED') ($out/gpu_check.json)"
  exit "$failed"
fi

step apptainer_test ok_exit -- "$runtime" test --nv "${flags[@]}" "$image"
step host_env env_ok -- env OMPI_MCA_pml=host_module_value OPAL_PREFIX=/apps/openmpi/4.1 \
  SCALELAB_PMIX_MCA_gds=ds12 "$runtime" exec "${flags[@]}" "$image" python -c \
  'import os; from mpi4py import MPI; e = os.environ; print("OPAL_PREFIX=%s OMPI_MCA_pml=%s threads=%d gds=%s" % (e["OPAL_PREFIX"], e.get("OMPI_MCA_pml"), MPI.Query_thread(), e["PMIX_MCA_gds"]))'
step ddp_nccl_allreduce ranks_ok -- env NCCL_DEBUG=VERSION "$runtime" exec --nv "${flags[@]}" \
  --bind "$out" "$image" torchrun --standalone --nproc-per-node 2 "$out/ddp_allreduce.py"
step horovod_nccl_allreduce ranks_ok -- env NCCL_DEBUG=VERSION "$runtime" exec --nv \
  "${flags[@]}" --bind "$out" "$image" mpirun -np 2 python "$out/horovod_allreduce.py"
[ "$dry" = 1 ] && exit 0

# One NCCL: DDP and Horovod ran the same NCCL release, the one the image's label names.
label="$("$runtime" inspect --labels "$image" 2>/dev/null | awk '/org.scalelab.nccl.version/ {print $NF}')"
versions="$(cat "$out/ddp_nccl_allreduce.log" "$out/horovod_nccl_allreduce.log" \
  | grep -o '"nccl": "[0-9.]*"' | sort -u)"
if [ "$versions" = "\"nccl\": \"$label\"" ]; then verdict=PASS; else verdict=FAIL; failed=1; fi
echo "$verdict one_nccl (label $label; seen: $(echo "$versions" | tr '\n' ' '))"
results+=("{\"step\": \"one_nccl\", \"exit\": 0, \"result\": \"$verdict\"}")

{ echo "["; (IFS=,; echo "${results[*]}"); echo "]"; } > "$out/gpu_check.json.tmp"
mv "$out/gpu_check.json.tmp" "$out/gpu_check.json"
echo "gpu_check: $([ "$failed" = 0 ] && echo 'all checks passed' || echo 'FAILED') ($out/gpu_check.json)"
exit "$failed"
