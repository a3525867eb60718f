"""commbench's allreduce against a bare mpi4py Allreduce loop, in the same run.

Checks that commbench measures the library and not itself: at the largest
message size (256 MiB by default) its allreduce bus bandwidth should be within
10% of a hand-written ``comm.Allreduce(MPI.IN_PLACE, buf)`` loop timed the same
way (warm-up, barrier, back-to-back calls, mean over ranks). Measurements are
interleaved over several rounds; the fastest round of each is compared (other
load on a shared machine only ever slows a round down), the medians are shown too.
Compare one library per run: Horovod's background thread competes for cores on
small machines and slows everything else in the process.

    python benchmarks/bench_commbench_vs_mpi.py                 # re-launches itself: mpirun -n 2
    mpirun -n 2 python benchmarks/bench_commbench_vs_mpi.py --libs mpi4py,torch,horovod

Prints one line per library: both busbw values and their ratio; exits 1 with
``--strict`` when the commbench mpi4py ratio is outside 1 +- tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def _relaunch(n: int) -> int:
    """Not started by a launcher: run this script under the venv's mpirun."""
    import subprocess

    mpirun = Path(sys.executable).with_name("mpirun")
    mpirun_cmd = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    if not mpirun_cmd:
        print("bench: mpirun not found", file=sys.stderr)
        return 2
    cmd = [mpirun_cmd, "--oversubscribe", "-n", str(n)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    cmd += [sys.executable, *sys.argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env, check=False).returncode


def bare_allreduce_time(comm, MPI, buf, iters: int, warmup: int) -> float:
    """Seconds per Allreduce, mean over ranks: the reference loop, no commbench code."""
    for _ in range(warmup):
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    elapsed = (time.perf_counter() - start) / iters
    return comm.allreduce(elapsed, op=MPI.SUM) / comm.Get_size()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="message size (default 256M)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--discard",
        type=int,
        default=1,
        help="untimed first rounds (page-in of the 256 MiB buffers)",
    )
    parser.add_argument(
        "--libs", default="mpi4py", help="commbench libraries to compare: mpi4py,torch,horovod"
    )
    parser.add_argument("-n", type=int, default=2, help="ranks when re-launching (default 2)")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--strict", action="store_true", help="exit 1 outside the tolerance")
    args = parser.parse_args()

    if not any(
        v in os.environ
        for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS")
    ):
        return _relaunch(args.n)

    import numpy as np
    from mpi4py import MPI

    from scalelab.comm import bench, libs

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    size = bench.parse_size(args.size, "--size")
    names = [s.strip() for s in args.libs.split(",") if s.strip()]
    comms = {name: libs.open_comm(name) for name in names}
    buf = np.ones(size // libs.ITEMSIZE, dtype=np.float32)
    bare: list[float] = []
    timed: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.discard + args.rounds):
        t_bare = bare_allreduce_time(comm, MPI, buf, args.iters, args.warmup)
        t_lib = {
            name: bench.benchmark(c, ["allreduce"], [size], args.iters, args.warmup, check=False)[
                0
            ]["time_s"]
            for name, c in comms.items()
        }
        if r >= args.discard:
            bare.append(t_bare)
            for name, t in t_lib.items():
                timed[name].append(t)
    factor = bench.bus_factor("allreduce", n)

    def busbw(t: float) -> float:
        return size / t / 1e9 * factor

    def rounds(ts: list[float]) -> str:
        return ", ".join(f"{t * 1e3:.1f}" for t in ts)

    bare_best, bare_med = busbw(min(bare)), busbw(statistics.median(bare))
    status = 0
    if rank == 0:
        print(
            f"allreduce {size} B on {n} ranks, {args.iters} iters x {args.rounds} rounds "
            f"({args.discard} discarded); busbw = size/time x 2(n-1)/n in GB/s (1e9 B/s); "
            "best = fastest round, med = median round"
        )
        print(
            f"  bare mpi4py Allreduce loop: best {bare_best:7.3f}  med {bare_med:7.3f} GB/s"
            f"  (ms per call by round: {rounds(bare)})"
        )
    for name in names:
        best, med = busbw(min(timed[name])), busbw(statistics.median(timed[name]))
        ratio_best, ratio_med = best / bare_best, med / bare_med
        ok = abs(ratio_best - 1.0) <= args.tolerance
        if name == "mpi4py" and not ok:
            status = 1
        if rank == 0:
            print(
                f"  commbench --lib {name:8s}: best {best:7.3f}  med {med:7.3f} GB/s"
                f"  (ms per call by round: {rounds(timed[name])})"
            )
            print(
                f"    ratio commbench/bare: best {ratio_best:.3f}  med {ratio_med:.3f}  -> "
                f"{'within' if ok else 'OUTSIDE'} {args.tolerance:.0%} (best-of-rounds)"
            )
    for c in comms.values():
        c.close()
    return status if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
