"""Staging throughput against the machine's plain sequential write throughput.

Stages synthetic data of about --size-mb and, in the same run and directory,
writes the same number of bytes sequentially twice: a Python write loop and
``dd`` (both ending with fsync, as staging does). The three are interleaved
--repeats times because shared machines are noisy; the ratio compares the
medians, against the faster of the two plain writes. Goal: ratio >= 0.5.

    .venv/bin/python benchmarks/bench_stage.py --size-mb 300 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalelab.data.stage import StageConfig, stage

BLOCK = 16 << 20


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def python_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially from memory, fsync included."""
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            n = min(left, BLOCK)
            fh.write(block[:n] if n < BLOCK else block)
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def dd_write(path: Path, nbytes: int) -> float | None:
    """Seconds for ``dd ... conv=fsync`` of the same bytes (None without dd)."""
    dd = shutil.which("dd")
    if dd is None:
        return None
    count = max(1, round(nbytes / BLOCK))
    t0 = time.perf_counter()
    subprocess.run(
        [
            dd,
            "if=/dev/zero",
            f"of={path}",
            f"bs={BLOCK}",
            f"count={count}",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds * nbytes / (count * BLOCK)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=300.0, help="bytes of images to stage")
    p.add_argument("--image-size", type=int, default=32, help="synthetic images are 3xSxS")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(".scratch"),
        help="where to write (default: .scratch/ in the current directory)",
    )
    p.add_argument(
        "--min-ratio", type=float, default=None, help="exit 1 when the median ratio is below this"
    )
    args = p.parse_args(argv)

    row = 3 * args.image_size * args.image_size
    samples = max(1, int(args.size_mb * 1e6 / row))
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.dir))
    stage_mbs, py_mbs, dd_mbs = [], [], []
    try:
        print(
            f"{samples} synthetic images of 3x{args.image_size}x{args.image_size} "
            f"(~{args.size_mb:.0f} MB) in {work}, {args.repeats} rounds"
        )
        print(
            f"{'round':>5} {'stage MB/s':>11} {'images/s':>10} {'stage cpu s':>12} "
            f"{'python MB/s':>12} {'dd MB/s':>9} {'load':>5}"
        )
        for i in range(args.repeats):
            out = work / f"staged-{i}"
            cpu0 = cpu_seconds()
            result = stage(
                StageConfig(
                    "synthetic",
                    out,
                    num_samples=samples,
                    image_size=(args.image_size, args.image_size),
                    seed=i,
                    progress=False,
                )
            )
            cpu = cpu_seconds() - cpu0
            nbytes = result.bytes
            shutil.rmtree(out)
            py = nbytes / 1e6 / python_write(work / "plain.bin", nbytes)
            dd_s = dd_write(work / "dd.bin", nbytes)
            dd = nbytes / 1e6 / dd_s if dd_s else float("nan")
            stage_mbs.append(result.mb_per_s)
            py_mbs.append(py)
            if dd_s:
                dd_mbs.append(dd)
            print(
                f"{i:>5} {result.mb_per_s:>11.0f} {result.images_per_s:>10.0f} {cpu:>12.2f} "
                f"{py:>12.0f} {dd:>9.0f} {os.getloadavg()[0]:>5.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = statistics.median(stage_mbs)
    plain = max(statistics.median(py_mbs), statistics.median(dd_mbs) if dd_mbs else 0.0)
    ratio = s / plain
    print(
        f"median: staging {s:.0f} MB/s, plain sequential write {plain:.0f} MB/s "
        f"(faster of python loop and dd, fsync included); ratio {ratio:.2f} (goal >= 0.5)"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        "(staging needs CPU for generating and hashing; other load lowers the ratio)"
    )
    if args.min_ratio is not None and ratio < args.min_ratio:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
