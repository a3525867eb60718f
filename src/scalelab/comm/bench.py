"""Collective communication benchmark with the nccl-tests conventions.

For each operation and message size: ``warmup`` untimed calls, a barrier, then
``iters`` back-to-back calls timed together; the time per call is averaged
over ranks (as nccl-tests reports it; the maximum over ranks is kept too).

* size S (bytes): the buffer each rank reduces (allreduce) or receives
  (broadcast); for allgather the *gathered* buffer, each rank contributing S/n.
* algbw = S / time
* busbw = algbw * factor, with factor 2(n-1)/n (allreduce), (n-1)/n (allgather),
  1 (broadcast): the per-link bandwidth a ring algorithm needs, comparable to
  the hardware peak whatever n (nccl-tests, doc/PERFORMANCE.md).

GB/s means 1e9 bytes per second, as in nccl-tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from scalelab.comm.libs import ITEMSIZE, Comm
from scalelab.errors import UsageError

OPS = ("allreduce", "allgather", "broadcast")
DEFAULT_MIN_BYTES = 1 << 10
DEFAULT_MAX_BYTES = 256 << 20


def message_sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """Geometric series min, min*factor, ... <= max (max itself always included)."""
    if factor < 2:
        raise UsageError(f"--factor: {factor} must be an integer >= 2")
    if min_bytes > max_bytes:
        raise UsageError(f"--min-bytes {min_bytes} is larger than --max-bytes {max_bytes}")
    sizes = []
    s = min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= factor
    if sizes[-1] != max_bytes:
        sizes.append(max_bytes)
    return sizes


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw of nccl-tests for ``op`` on ``n`` ranks."""
    if op == "allreduce":
        return 2.0 * (n - 1) / n
    if op == "allgather":
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    raise ValueError(op)


def elements(op: str, size_bytes: int, n: int) -> int:
    """Elements per rank for a message of ``size_bytes`` (allgather: each rank's share)."""
    per = size_bytes // ITEMSIZE
    return max(1, per // n if op == "allgather" else per)


#: Timed calls are split into up to this many blocks; the median block is reported, so one
#: descheduled block on a shared node does not become the figure (nccl-tests times a
#: single block and reports its mean).
BLOCKS = 5


def time_op(comm: Comm, run: Callable[[], Any], iters: int, warmup: int) -> float:
    """Seconds per call on this rank: warm-up, barrier, then ``iters`` timed calls in up to
    ``BLOCKS`` synchronised blocks; the median block's time per call."""
    for _ in range(warmup):
        run()
    comm.sync()
    comm.barrier()
    blocks = min(BLOCKS, iters)
    per_call = []
    for b in range(blocks):
        calls = iters // blocks + (b < iters % blocks)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        comm.sync()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def benchmark(
    comm: Comm,
    ops: Iterable[str],
    sizes: list[int],
    iters: int,
    warmup: int,
    check: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every (op, size); return one record per pair (identical on every rank)."""
    ops = list(ops)
    n = comm.size
    gather = max((elements(op, s, n) for op in ops for s in sizes if op == "allgather"), default=0)
    comm.reserve(max(elements(op, s, n) for op in ops for s in sizes), gather)
    nodes = len(set(comm.gather(_host())))
    records = []
    for op in ops:
        for size in sizes:
            count = elements(op, size, n)
            nbytes = count * ITEMSIZE * (n if op == "allgather" else 1)
            run, verify = comm.prepare(op, count)
            t = time_op(comm, run, iters, warmup)
            t_mean = comm.reduce(t, "sum") / n
            t_max = comm.reduce(t, "max")
            wrong = int(comm.reduce(float(verify()), "sum")) if check else -1
            algbw = nbytes / t_mean / 1e9
            rec = {
                "lib": comm.lib,
                "backend": comm.backend,
                "op": op,
                "size_bytes": nbytes,
                "count": count,
                "dtype": "float32",
                "world_size": n,
                "nodes": nodes,
                "iters": iters,
                "warmup": warmup,
                "time_s": t_mean,
                "time_max_s": t_max,
                "algbw_GBps": algbw,
                "busbw_GBps": algbw * bus_factor(op, n),
                "wrong": wrong,
            }
            records.append(rec)
            if on_record:
                on_record(rec)
    return records


def _host() -> str:
    import socket

    return socket.gethostname()


HEADER = (
    f"{'op':>10} {'size(B)':>12} {'count':>10} {'time(us)':>12} {'algbw(GB/s)':>12} "
    f"{'busbw(GB/s)':>12} {'#wrong':>7}"
)


def format_record(rec: dict) -> str:
    """One table line in the spirit of nccl-tests' output."""
    wrong = "N/A" if rec["wrong"] < 0 else str(rec["wrong"])
    return (
        f"{rec['op']:>10} {rec['size_bytes']:>12d} {rec['count']:>10d} "
        f"{rec['time_s'] * 1e6:>12.1f} {rec['algbw_GBps']:>12.4f} "
        f"{rec['busbw_GBps']:>12.4f} {wrong:>7}"
    )
