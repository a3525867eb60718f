"""``scalelab analyze``: scaling tables and plots from run directories and/or CSV tables."""

from __future__ import annotations

import argparse

from scalelab.analysis import columns, runs, runs_csv
from scalelab.errors import UsageError
from scalelab.fsio import read_text
from scalelab.output_guard import check_target


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="scaling analysis of training runs (and published tables): tables, fits, plots",
        description=(
            "Speedup, parallel efficiency, Karp-Flatt serial fraction, Amdahl/Gustafson fits, "
            "marginal gain per doubling, cost proxy and sweet spot, written as CSV, Parquet, "
            "Markdown and PNG/SVG plots into --out (atomically: all outputs or none)."
        ),
    )
    p.add_argument(
        "results",
        nargs="*",
        metavar="RUN_DIR",
        help="run directories, or directories holding them (searched recursively)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or an earlier `analyze` output (then "
        "replaced as a whole); never one of the inputs or a directory holding one",
    )
    p.add_argument(
        "--from-csv",
        action="append",
        default=[],
        metavar="FILE",
        help="a table with columns gpus|ranks and throughput|time (optional: nodes, "
        "mode, backend, label, global_batch, accuracy, epoch_samples, repeat); "
        "repeatable",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.7,
        help="efficiency threshold of the sweet spot (default 0.7)",
    )
    p.add_argument(
        "--mode",
        choices=("strong", "weak"),
        default=None,
        help="scaling mode of CSV rows without a mode column (default strong)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="validation accuracy (0..1) for time-to-target; default: the trainer's",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scalelab.analysis import report, scaling

    if not args.results and not args.from_csv:
        raise UsageError("give at least one RUN_DIR or --from-csv FILE")
    check_target(args.out, "analysis", [*args.results, *args.from_csv])
    for path in args.from_csv:
        read_text(path, "--from-csv")  # missing or not UTF-8: one line naming the file
    if not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold: {args.threshold} must be in (0, 1]")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy: {args.target_accuracy} must be in (0, 1]")
    rows = runs.load_runs(args.results, args.target_accuracy) if args.results else []
    for path in args.from_csv:
        rows.extend(runs_csv.load_csv(path, args.mode))
    frame = runs.to_frame(rows)
    table, fits = scaling.analyse(frame, args.threshold)
    out = report.write(
        args.out,
        frame,
        table,
        fits,
        args.threshold,
        [*map(str, args.results), *map(str, args.from_csv)],
    )
    for fit in fits.itertuples():
        spot = (
            f"sweet spot {fit.sweet_spot_workers:g} workers "
            f"(efficiency {fit.sweet_spot_efficiency:.1%})"
            if fit.sweet_spot_workers == fit.sweet_spot_workers
            else "no sweet spot"
        )
        print(
            f"{fit.source}/{fit.backend}/{fit.mode}: {fit.configurations} configurations, "
            f"Amdahl {_fraction(fit, 'amdahl')}, Gustafson {_fraction(fit, 'gustafson')}, "
            f"{spot}"
        )
    untimed = int(table["untimed_runs"].sum())
    if untimed:
        print(
            f"{untimed} run(s) without timed steps: flagged '{columns.NO_TIMED_STEPS}', left "
            "out of the metrics and fits"
        )
    print(f"wrote {out}")
    return 0


def _fraction(fit, model: str) -> str:
    """``f=0.9512``, with 'exact through N points' where the fit had no spare point."""
    f = getattr(fit, f"{model}_parallel_fraction")
    if f != f:  # NaN: fewer than two scales with a throughput
        return "no fit"
    text = f"f={f:.4f}"
    return text + (
        f" (exact through {fit.fit_points} points)" if getattr(fit, f"{model}_exact") else ""
    )
