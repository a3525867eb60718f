"""The pipeline bubble model against a measured pipeline, in the same run.

For pp stages and m micro-batches of a batch B, the schedule runs m + pp - 1 slots of
one stage's forward and backward: the ideal m slots plus the bubble (pp - 1) / m of them
(Narayanan et al. 2021, section 2.2; ``pipeline_rules.bubble_fraction``). This script
times, on each rank, its own stage's forward + backward of one micro-batch of B / m
samples alone (no sends), takes the slowest stage as t(m), predicts a step as
m t(m) (1 + bubble) and prints measured / predicted for m = 1, 2, 4, 8 (GPipe where
m < pp, 1F1B otherwise). Stages are never exactly equal (the first holds the embedding,
the last the head and the loss), so a second column predicts (m - 1) t_max + the sum of
the stages' t: the slowest stage paces the steady state, fill and drain pass every stage
once. The sends between stages are not in the prediction: the
ratio's excess over 1 is what they and the schedule's bookkeeping cost.

One thread per rank, one rank per core: run it where pp cores are free (the timing of
ranks that share a core says nothing about the bubble).

    python benchmarks/bench_pipeline_bubble.py                  # re-launches itself: torchrun, pp=2
    python benchmarks/bench_pipeline_bubble.py --pp 4 --out build/bubble.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _relaunch(pp: int) -> int:
    """Not started by a launcher: run this script under torchrun with pp processes."""
    cores = len(os.sched_getaffinity(0))
    if cores < pp:
        print(f"bench: pp={pp} needs {pp} free cores, this machine has {cores}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp)]
    cmd += ["--master-port", "29583", *sys.argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, check=False).returncode


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages (processes)")
    parser.add_argument("--batch", type=int, default=32, help="samples per step (B)")
    parser.add_argument("--micro", default="1,2,4,8", help="micro-batch counts m to time")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256, help="d_model")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point (fastest kept)")
    parser.add_argument("--out", type=Path, help="also write the points as JSON here")
    return parser.parse_args()


def _model(args: argparse.Namespace):
    import torch

    from scalelab.models.gpt import gpt

    torch.manual_seed(0)
    heads = max(1, args.width // 64)
    return gpt(256, (args.seq,), d_model=args.width, n_layers=args.layers, n_heads=heads)


def _stage_time(stage, rank: int, pp: int, b: int, args: argparse.Namespace) -> float:
    """Median seconds of this rank's stage forward + backward on ``b`` samples, alone."""
    import torch

    from scalelab.backends.pipeline import lm_loss

    tokens = torch.randint(256, (b, args.seq))
    times = []
    for _ in range(args.steps + 2):
        x = tokens if rank == 0 else torch.randn(b, args.seq, args.width, requires_grad=True)
        start = time.perf_counter()
        out = stage(x)
        if rank == pp - 1:
            lm_loss(out, tokens).backward()
        else:
            out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - start)
        stage.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def _round(args, rank: int, pp: int, m: int, modules, pipe, x) -> tuple[list[float], float]:
    """One round: every stage's time alone, then the pipeline's step time (medians)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(_stage_time(modules[0], rank, pp, args.batch // m, args))
    stage_times = [torch.zeros(()) for _ in range(pp)]
    dist.all_gather(stage_times, mine)
    steps = []
    for _ in range(args.steps + 2):
        dist.barrier()
        start = time.perf_counter()
        pipe.step(x, x)
        dist.barrier()
        steps.append(time.perf_counter() - start)
        for mod in modules:
            mod.zero_grad(set_to_none=True)
    return [float(t) for t in stage_times], statistics.median(steps[2:])


def _point(args: argparse.Namespace, rank: int, m: int) -> dict | None:
    """Measure one m: the slowest stage's t(m) and the pipeline's step time."""
    import torch

    from scalelab.backends.pipeline import build_pipeline, split_for_rank
    from scalelab.backends.pipeline_rules import bubble_fraction

    pp = args.pp
    schedule = "gpipe" if m < pp else "1f1b"
    model = _model(args)
    _, modules = split_for_rank(model, rank, pp, 1, schedule)
    pipe = build_pipeline(modules, rank, pp, 1, m, schedule, torch.device("cpu"))
    x = torch.randint(256, (args.batch, args.seq))
    rounds = [_round(args, rank, pp, m, modules, pipe, x) for _ in range(args.rounds)]
    # Other load only ever slows a round down: the fastest round of each is compared.
    times = [min(r[0][s] for r in rounds) for s in range(pp)]
    measured = min(r[1] for r in rounds)
    slowest = max(times)
    bubble = bubble_fraction(pp, 1, m)
    predicted = m * slowest * (1 + bubble)
    # Unequal stages: the slowest sets the pace of the m - 1 steady slots, and fill and
    # drain pass once through every stage; equal stages give m t (1 + bubble) again.
    unequal = (m - 1) * slowest + sum(times)
    if rank:
        return None
    return {
        "pp": pp,
        "m": m,
        "schedule": schedule,
        "micro_batch": args.batch // m,
        "stage_s": times,
        "bubble": bubble,
        "predicted_s": predicted,
        "predicted_unequal_s": unequal,
        "measured_s": measured,
        "ratio": measured / predicted,
        "ratio_unequal": measured / unequal,
    }


def main() -> int:
    args = _args()
    if "RANK" not in os.environ:
        return _relaunch(args.pp)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    points = [_point(args, rank, int(m)) for m in args.micro.split(",")]
    dist.destroy_process_group()
    if rank:
        return 0
    print(
        f"pipeline bubble, pp={args.pp}, B={args.batch}, GPT {args.layers}x{args.width}, "
        f"seq {args.seq}, 1 thread per rank"
    )
    print(
        "| m | schedule | stage s (each) | bubble | predicted s | measured s | "
        "measured/predicted | with unequal stages |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in points:
        stages = " / ".join(f"{t:.4f}" for t in p["stage_s"])
        print(
            f"| {p['m']} | {p['schedule']} | {stages} | {p['bubble']:.3f} | "
            f"{p['predicted_s']:.4f} | {p['measured_s']:.4f} | {p['ratio']:.3f} | "
            f"{p['ratio_unequal']:.3f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(points, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
