"""One Horovod training step on one rank: the image's %test, runnable anywhere.

``python -m scalelab.container.selftest [--expect-...]`` initialises Horovod
(MPI singleton), wraps SGD in ``hvd.DistributedOptimizer``, takes one step of
a small network on CUDA when a GPU is visible (CPU otherwise) and checks that
the loss is finite and the weights moved. The expectations compare what was
built with what the labels promise. Prints one JSON line; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def run_step() -> dict:
    """The training step; returns what was observed."""
    import horovod
    import horovod.torch as hvd
    import torch
    from mpi4py import MPI

    hvd.init()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", hvd.local_rank()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.to(device)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 16, device=device)
    y = torch.randint(0, 4, (8,), device=device)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    after = list(model.parameters())
    moved = any(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))
    summed = hvd.allreduce(torch.ones(1, device=device), op=hvd.Sum).item()
    result = {
        "loss": float(loss.item()),
        "weights_moved": moved,
        "allreduce_sum": summed,
        "size": hvd.size(),
        "device": str(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "horovod": horovod.__version__,
        "mpi_built": bool(hvd.mpi_built()),
        "gloo_built": bool(hvd.gloo_built()),
        "nccl_built": bool(hvd.nccl_built()),
        "mpi_library": MPI.Get_library_version().splitlines()[0].strip().rstrip("\x00"),
    }
    hvd.shutdown()
    return result


def problems(r: dict, args: argparse.Namespace) -> list[str]:
    """What differs from the expectations (empty: all good)."""
    out = []
    if not math.isfinite(r["loss"]):
        out.append(f"loss is {r['loss']}")
    if not r["weights_moved"]:
        out.append("the optimizer step did not change the weights")
    if r["allreduce_sum"] != r["size"]:
        out.append(f"allreduce of ones gave {r['allreduce_sum']}, expected {r['size']}")
    if not r["mpi_built"]:
        out.append("Horovod was built without MPI")
    if args.expect_torch and r["torch"].split("+")[0] != args.expect_torch:
        out.append(f"torch is {r['torch']}, expected {args.expect_torch}")
    if args.expect_horovod and r["horovod"] != args.expect_horovod:
        out.append(f"horovod is {r['horovod']}, expected {args.expect_horovod}")
    if args.expect_cuda and r["torch_cuda"] != args.expect_cuda:
        out.append(f"torch was built for CUDA {r['torch_cuda']}, expected {args.expect_cuda}")
    if args.expect_nccl and not r["nccl_built"]:
        out.append("Horovod was built without NCCL operations")
    if args.expect_mpi and args.expect_mpi not in r["mpi_library"]:
        out.append(f"MPI library is {r['mpi_library']!r}, expected {args.expect_mpi!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalelab.container.selftest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--expect-torch", help="torch version (without +local tag)")
    parser.add_argument("--expect-horovod", help="horovod version")
    parser.add_argument("--expect-cuda", help="CUDA major.minor torch was built for")
    parser.add_argument("--expect-nccl", action="store_true", help="Horovod has NCCL operations")
    parser.add_argument("--expect-mpi", help="text in MPI_Get_library_version, e.g. 'Open MPI'")
    args = parser.parse_args(argv)
    result = run_step()
    bad = problems(result, args)
    print(json.dumps({**result, "ok": not bad, "problems": bad}, sort_keys=True))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
