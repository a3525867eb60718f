"""scalelab train vs a bare DDP script: same model, data, ranks, threads; side by side.

Runs both, interleaved (bare, trainer, bare, trainer, ...), ``--rounds`` times
each (at least 7) under the same launcher (2 ranks, gloo, 1 thread per rank, 64
images of 3x32x32 per rank per step, warm-up steps excluded from both) and prints
samples/s of each (median over rounds) and the ratio trainer/bare: the median of
the per-round ratios (each round's two runs share the machine's momentary load),
with a distribution-free lower confidence bound of that median: the k-th smallest
per-round ratio, k the largest with P(Binomial(n, 1/2) <= k - 1) <= 0.10, so the
true median ratio lies above it with >= 90% confidence (the sign-test /
order-statistic interval; no normality assumed). The goal: bound >= 0.97. It also
prints the same statistic for the bare script against itself (consecutive rounds, A/A):
the noise floor of the machine, below which no trainer's bound can be shown.

    .venv/bin/python benchmarks/bench_train_vs_bare.py [--launcher torchrun|mpirun]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def launcher_cmd(kind: str, ranks: int) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return [
        str(VENV_BIN / "mpirun"),
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(ranks),
        sys.executable,
    ]


def run(cmd: list[str]) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:6]}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def bare(args: argparse.Namespace) -> float:
    out = run(
        [
            *launcher_cmd(args.launcher, args.ranks),
            str(HERE / "bare_ddp.py"),
            str(args.steps),
            str(args.warmup),
            str(args.batch),
        ]
    )
    line = next(x for x in out.splitlines() if x.startswith("{"))
    return json.loads(line)["samples_per_s"]


def trainer(args: argparse.Namespace, work: Path, i: int) -> float:
    out_dir = work / f"train{i}"
    settings = {
        "model.name": "cnn",
        "data.source": "synthetic",
        "data.image_shape": "[3, 32, 32]",
        "data.num_classes": 10,
        "data.num_samples": args.batch * args.ranks * (args.steps + args.warmup),
        "data.val_split": "null",
        "optim.per_rank_batch_size": args.batch,
        "optim.lr": 0.01,
        "optim.momentum": 0.9,
        "train.epochs": 1,
        "train.threads": 1,
        "train.progress": "false",
        "metrics.warmup_steps": args.warmup,
        "checkpoint.every_epochs": 0,
        "dist.backend": "ddp",
    }
    settings.update(dict(kv.split("=", 1) for kv in args.set))
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    run(
        [
            *launcher_cmd(args.launcher, args.ranks),
            "-m",
            "scalelab",
            "train",
            "--out",
            str(out_dir),
            *sets,
        ]
    )
    return json.loads((out_dir / "summary.json").read_text())["samples_per_s"]


def median_lower_bound(values: list[float], alpha: float = 0.10) -> tuple[float, float]:
    """(bound, confidence): the order statistic x_(k) below the median with confidence
    1 - P(Binomial(n, 1/2) <= k - 1) >= 1 - alpha, k as large as that allows."""
    n, xs = len(values), sorted(values)
    tail = 0.0  # P(Bin(n, 1/2) <= k - 1), growing with k
    k = 0
    while k < n and tail + math.comb(n, k) / 2**n <= alpha:
        tail += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return math.nan, 0.0
    return xs[k - 1], 1.0 - tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", choices=["torchrun", "mpirun"], default="torchrun")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch", type=int, default=64, help="images per rank per step")
    p.add_argument(
        "--rounds", type=int, default=9, help="runs of each, interleaved (default 9, at least 7)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra scalelab train setting (e.g. metrics.log_every=10)",
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=None,
        help="exit 1 when the lower bound of the median ratio is below this",
    )
    args = p.parse_args()
    if args.rounds < 7:
        p.error(f"--rounds {args.rounds}: at least 7 (a lower bound of the median needs them)")
    bare_rates, train_rates = [], []
    with tempfile.TemporaryDirectory(prefix="scalelab-bench-") as work:
        for i in range(args.rounds):
            bare_rates.append(bare(args))
            train_rates.append(trainer(args, Path(work), i))
            print(
                f"round {i + 1}: bare {bare_rates[-1]:8.1f}  scalelab {train_rates[-1]:8.1f} "
                f"samples/s  ratio {train_rates[-1] / bare_rates[-1]:.3f}",
                flush=True,
            )
    b, t = statistics.median(bare_rates), statistics.median(train_rates)
    print(
        f"launcher={args.launcher} ranks={args.ranks} batch/rank={args.batch} "
        f"steps={args.steps} (+{args.warmup} warm-up) threads/rank=1 rounds={args.rounds}"
    )
    print(f"bare DDP : {b:.1f} samples/s (median)")
    print(f"scalelab : {t:.1f} samples/s (median)")
    # Rounds share the machine's momentary load: the paired ratio is the steadier estimate.
    paired = [tr / br for tr, br in zip(train_rates, bare_rates, strict=True)]
    ratio = statistics.median(paired)
    bound, conf = median_lower_bound(paired)
    print(
        f"ratio    : {ratio:.3f} median of {len(paired)} per-round ratios (range "
        f"{min(paired):.3f}-{max(paired):.3f}); ratio of medians {t / b:.3f}"
    )
    print(
        f"bound    : {bound:.3f} lower {conf:.1%} confidence bound of the median ratio "
        "(order statistic, sign test); goal >= 0.97"
    )
    # A/A: the same bare script against itself, one round apart. What this machine's
    # run-to-run noise alone does to the same statistic: a bound the code cannot beat here.
    aa = [b2 / b1 for b1, b2 in zip(bare_rates, bare_rates[1:], strict=False)]
    aa_bound, aa_conf = median_lower_bound(aa)
    print(
        f"A/A      : bare vs bare one round later: median {statistics.median(aa):.3f}, "
        f"range {min(aa):.3f}-{max(aa):.3f}, lower {aa_conf:.1%} bound {aa_bound:.3f} "
        "(the machine's noise floor for this bound)"
    )
    print(
        json.dumps(
            {
                "ratio_median": ratio,
                "ratio_lower_bound": bound,
                "bound_confidence": conf,
                "ratios": paired,
                "bare": bare_rates,
                "trainer": train_rates,
                "aa_ratios": aa,
                "aa_lower_bound": aa_bound,
            }
        )
    )
    return 1 if args.min_ratio is not None and bound < args.min_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
