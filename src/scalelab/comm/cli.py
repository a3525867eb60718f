"""``scalelab commbench``: collective bandwidth, run on every rank (rank 0 reports).

Collective benchmark with nccl-tests definitions (algbw = size/time; busbw = algbw x
2(n-1)/n for allreduce, (n-1)/n for allgather, 1 for broadcast). Start it on every rank with
any launcher: mpirun, srun (--mpi=pmix for mpi4py/Horovod), torchrun, horovodrun. Rank 0
prints the table and writes --out.
"""

from __future__ import annotations

import argparse
import sys

from scalelab.comm import bench, libs, results
from scalelab.errors import UsageError
from scalelab.layout import detect
from scalelab.output_guard import check_target
from scalelab.units import check_seconds, parse_size


def register(subparsers) -> None:
    """Add ``commbench`` (its description is this module's docstring)."""
    p = subparsers.add_parser(
        "commbench",
        description=" ".join(__doc__.split("\n\n")[1].split()),
        help="allreduce/allgather/broadcast bandwidth (torch.distributed, Horovod, mpi4py)",
    )
    p.add_argument("--lib", required=True, choices=("torch", "horovod", "mpi4py"))
    p.add_argument(
        "--backend",
        default="auto",
        help="torch only: gloo, nccl or mpi (auto: nccl with CUDA, else gloo)",
    )
    p.add_argument(
        "--ops",
        default="allreduce,allgather,broadcast",
        help="comma-separated subset of allreduce,allgather,broadcast",
    )
    p.add_argument("--min-bytes", default="1K", help="smallest message (default 1K)")
    p.add_argument("--max-bytes", default="256M", help="largest message (default 256M)")
    p.add_argument(
        "--factor", type=int, default=2, help="size step: 2 (powers of two, default) or 4, ..."
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per size (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per size (default 5)")
    p.add_argument(
        "--no-check", action="store_true", help="skip the correctness check after each size"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="torch: seconds before a stuck collective fails (default 300)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (written by rank 0): new, empty, or an earlier commbench output",
    )
    p.set_defaults(func=commbench)


def commbench(args: argparse.Namespace) -> int:
    import json
    import time

    check_target(args.out, "commbench")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in bench.OPS]
    if bad or not ops:
        raise UsageError(f"--ops: {', '.join(bad) or 'empty'} not in {', '.join(bench.OPS)}")
    sizes = bench.message_sizes(
        parse_size(args.min_bytes, "--min-bytes"),
        parse_size(args.max_bytes, "--max-bytes", maximum=_max_message()),
        args.factor,
    )
    if not (1 <= args.iters <= MAX_CALLS and 0 <= args.warmup <= MAX_CALLS):
        raise UsageError(f"--iters must be 1..{MAX_CALLS} and --warmup 0..{MAX_CALLS}")
    check_seconds(args.timeout, "--timeout", minimum=1.0)  # below 1 s every collective fails
    comm = libs.open_comm(args.lib, args.backend, args.timeout)
    main = comm.rank == 0

    def show(rec: dict) -> None:
        if main:
            print(bench.format_record(rec), flush=True)

    if main:
        print(
            f"# commbench lib={comm.lib} backend={comm.backend} ranks={comm.size} "
            f"iters={args.iters} warmup={args.warmup}",
            flush=True,
        )
        print(bench.HEADER, flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    records = bench.benchmark(
        comm, ops, sizes, args.iters, args.warmup, check=not args.no_check, on_record=show
    )
    hosts = comm.gather(libs.hostname())
    meta = {
        "lib": comm.lib,
        "backend": comm.backend,
        "world_size": comm.size,
        "nodes": len(set(hosts)),
        "hosts": hosts,
        "device": comm.device,
        "launcher": _launcher(),
        "ops": ops,
        "sizes": sizes,
        "iters": args.iters,
        "warmup": args.warmup,
        "checked": not args.no_check,
        "started_at": started,
        "versions": comm.versions(),
        "argv": sys.argv,
        "definitions": f"time: per call, the median of up to {bench.BLOCKS} timed blocks, "
        "mean over ranks; algbw = size/time (1e9 B/s); busbw = algbw x "
        "2(n-1)/n (allreduce), (n-1)/n (allgather), 1 (broadcast)",
    }
    wrong = sum(r["wrong"] for r in records if r["wrong"] > 0)
    if main:
        out = results.write(args.out, records, meta)
        print(json.dumps({"out": str(out), "wrong": wrong}), flush=True)
    comm.barrier()
    comm.close()
    if wrong:
        print(f"scalelab commbench: error: {wrong} wrong elements (see #wrong)", file=sys.stderr)
        return 1
    return 0


#: Timed or warm-up calls per size: beyond this a typo that would run for days.
MAX_CALLS = 100_000


def _max_message() -> int:
    """The largest --max-bytes: a quarter of this machine's memory (the benchmark holds a
    send and a receive buffer of that size, and the result check a copy)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 1 << 40


def _launcher() -> str:
    """The launcher's name only: a dummy MASTER_ADDR keeps detect() from querying MPI."""
    import os

    try:
        return detect({**os.environ, "MASTER_ADDR": "-"}, allow_mpi_query=False).launcher
    except UsageError:
        return "unknown"
