"""Snakemake's bookkeeping overhead on the default workflow, as a ratio.

Runs the workflow with config/config.yaml in a fresh copy, every job given all
cores (`--set-threads`) so jobs run one after another, then compares the wall
time of the whole run with the sum of the jobs' own run times (Snakemake's
`benchmark:` files). Goal: wall / sum <= 1.15.

    .venv/bin/python benchmarks/bench_workflow_overhead.py [--config config/config.yaml]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = ["stage", "train", "evaluate", "commbench", "analyze", "predict"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--goal", type=float, default=1.15)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy the study's results/analysis here before cleaning up "
        "(its scaling table shows the run's flags)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scalelab-overhead-"))
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    schema = work / "workflow" / "schemas" / "config.schema.yaml"
    schema.unlink()
    shutil.copy2(REPO / "workflow" / "schemas" / "config.schema.yaml", schema)

    threads = [f"{rule}={args.cores}" for rule in RULES]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(args.cores),
        "--configfile",
        str(REPO / args.config),
        "--set-threads",
        *threads,
        "--quiet",
    ]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True)
    wall = time.perf_counter() - start

    jobs = 0
    total = 0.0
    for tsv in (work / "results" / "benchmarks").rglob("*.tsv"):
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        total += float(row["s"])
        jobs += 1
    ratio = wall / total
    print(f"jobs: {jobs}  sum of job run times: {total:.1f} s  workflow wall time: {wall:.1f} s")
    print(
        f"overhead ratio wall/sum = {ratio:.3f} (goal <= {args.goal})  "
        f"{'PASS' if ratio <= args.goal else 'FAIL'}"
    )
    if args.keep:
        shutil.copytree(work / "results" / "analysis", args.keep, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
