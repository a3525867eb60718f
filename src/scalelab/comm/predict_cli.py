"""``scalelab predict``: step time, throughput and efficiency at scale from a commbench curve.

From one measured configuration (compute time per step, gradient bytes) and a commbench
allreduce curve (fitted latency alpha and bandwidth beta), predict step time, throughput and
efficiency up to --max-nodes x --ranks-per-node. Model: t_ar(n,S) = 2(n-1) alpha + 2(n-1)/n
S/beta; t_step = t_data + t_compute + (1-overlap) t_ar. Writes CSV, Markdown, JSON and a
plot into --out.

The model and its report live in :mod:`scalelab.comm.predict` and
:mod:`scalelab.comm.predict_report`; this module is the command around them. With
--advise, predict is the layout advisor instead (:mod:`scalelab.comm.advise_cli`): the
best (dp, tp, pp, m, v) of a GPT on a declared hardware profile, no measurement needed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from scalelab.analysis import runs, runs_csv
from scalelab.analysis.columns import NO_TIMED_STEPS
from scalelab.analysis.runs import load_run
from scalelab.backends.registry import SINGLE
from scalelab.comm import advise_cli, results
from scalelab.errors import UsageError
from scalelab.fsio import read_text
from scalelab.output_guard import check_target
from scalelab.units import parse_size


def register(subparsers) -> None:
    """Add ``predict`` (its description is this module's docstring)."""
    p = subparsers.add_parser(
        "predict",
        description=" ".join(__doc__.split("\n\n")[1].split()),
        help="predict step time, throughput and efficiency at scale (ring-allreduce model)",
    )
    p.add_argument(
        "--commbench",
        metavar="DIR|CSV",
        help="commbench output (directory, commbench.csv or .jsonl); required without --advise",
    )
    p.add_argument(
        "--run", metavar="RUN_DIR", help="measured base configuration: a completed training run"
    )
    p.add_argument("--compute-time", type=float, help="seconds of compute per step at the base")
    p.add_argument("--data-time", type=float, help="seconds waiting for data per step (default 0)")
    p.add_argument(
        "--grad-bytes", help="bytes allreduced per step, e.g. 100M (4 bytes per fp32 parameter)"
    )
    p.add_argument("--global-batch", type=float, help="samples per step over all base ranks")
    p.add_argument("--base-ranks", type=int, help="ranks of the base configuration")
    p.add_argument(
        "--mode",
        choices=("weak", "strong"),
        help="weak: per-rank batch fixed; strong: global batch fixed "
        "(default: the run's mode, else weak)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="fraction of the allreduce hidden behind compute, 0..1 (default 0)",
    )
    p.add_argument(
        "--measured",
        nargs="*",
        default=[],
        metavar="RUN_DIR",
        help="runs (or directories of runs) to compare the prediction with "
        "(default: the --run itself)",
    )
    p.add_argument(
        "--measured-csv",
        metavar="FILE",
        help="measured (ranks|gpus, throughput) table to compare with",
    )
    p.add_argument("--backend", help="keep only measured runs of this backend")
    p.add_argument("--max-nodes", type=int, default=64, help="largest node count (default 64)")
    p.add_argument(
        "--ranks-per-node", type=int, default=4, help="ranks (GPUs) per node (default 4)"
    )
    p.add_argument("--min-fit-bytes", default="0", help="fit only sizes >= this (default all)")
    p.add_argument("--max-fit-bytes", default=None, help="fit only sizes <= this (default all)")
    p.add_argument(
        "--allow-cpu-curve",
        action="store_true",
        help="fit a CPU (gloo/MPI) allreduce curve to a run that trained on GPUs "
        "(refused by default: it cannot predict NCCL)",
    )
    p.add_argument(
        "--out",
        help="output directory: new, empty, or an earlier `predict` output (then "
        "replaced as a whole); never one of the inputs; required without --advise",
    )
    advise_cli.add_arguments(p)
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> int:
    if args.advise:
        return advise_cli.run(args)
    advise_cli.check_not_advising(args)
    for flag in ("commbench", "out"):
        if getattr(args, flag) is None:
            raise UsageError(f"--{flag}: required (or --advise for the layout advisor)")
    from scalelab.comm import predict as model
    from scalelab.comm import predict_report

    check_target(args.out, "predict", predict_report.inputs_of(args))
    min_fit = parse_size(args.min_fit_bytes, "--min-fit-bytes", minimum=0)
    max_fit = (
        parse_size(args.max_fit_bytes, "--max-fit-bytes") if args.max_fit_bytes else float("inf")
    )
    for flag, path in (("--commbench", args.commbench), ("--measured-csv", args.measured_csv)):
        if path and not Path(path).is_dir():
            read_text(path, flag)  # missing or not UTF-8: one line naming the file
    base, run_row = _base(args)  # the run's refusals come before the curve's
    records = results.read(args.commbench)
    fit = model.fit_ring(records, min_fit, max_fit)
    model.check_curve(records, run_row, args.allow_cpu_curve)
    ranks = model.scales(args.max_nodes, args.ranks_per_node)
    measured = _measured(args, run_row, base.mode)
    ranks = sorted(set(ranks) | {int(r) for r in measured["ranks"]})
    # the collectives of the base run's backend (fsdp, tp), not only ddp's allreduce
    comm = model.comm_model_from_run(args.run) if args.run else None
    pred = model.predict(base, fit, ranks, comm)
    errors = model.compare(pred, measured)
    out = predict_report.write(args.out, pred, errors, measured, base, fit, args)
    if fit.beta_is_lower_bound:
        print(f"scalelab predict: warning: {predict_report.bound_warning(fit)}", file=sys.stderr)
    print(
        f"alpha = {fit.alpha_s * 1e6:.2f} us, beta {'>=' if fit.beta_is_lower_bound else '='} "
        f"{fit.beta_Bps / 1e9:.3f} GB/s "
        f"(fit rms rel error {fit.rms_rel_error:.1%} over {fit.points} sizes)"
    )
    for e in errors.itertuples():
        print(
            f"ranks {e.ranks:g}: measured {e.measured_throughput:.4g}, predicted "
            f"{e.predicted_throughput:.4g} samples/s ({e.throughput_rel_error:+.1%})"
        )
    last = pred.iloc[-1]
    print(
        f"at {last['ranks']:g} ranks: step {last['step_time_s'] * 1e3:.2f} ms, "
        f"{last['throughput']:.4g} samples/s, efficiency {last['efficiency']:.1%}"
    )
    print(f"wrote {out}")
    return 0


def _base(args: argparse.Namespace):
    """The base configuration: the run's measurements, overridden by explicit flags."""
    import math

    from scalelab.comm.predict import Base

    row: dict = {}
    if args.run:
        row = load_run(args.run, count_params=args.grad_bytes is None)
        _refuse_pipeline_base(args.run, row)
    compute = args.compute_time if args.compute_time is not None else row.get("compute_s")
    if args.compute_time is None and row.get("flags"):
        raise UsageError(
            f"--run {args.run}: {row['flags']} (its steps were all warm-up, so its "
            "compute time is not the configuration's); give --compute-time or "
            "another run"
        )
    if compute is None or math.isnan(compute):
        raise UsageError("--compute-time: required (no --run, or the run has no compute time)")
    data = args.data_time if args.data_time is not None else row.get("data_s", 0.0)
    grad = parse_size(args.grad_bytes, "--grad-bytes") if args.grad_bytes else row.get("grad_bytes")
    if grad is None or math.isnan(grad):
        raise UsageError("--grad-bytes: required (no --run, or its gradient size is unknown)")
    batch = args.global_batch if args.global_batch is not None else row.get("global_batch")
    if batch is None or math.isnan(batch):
        raise UsageError("--global-batch: required without --run")
    ranks = args.base_ranks if args.base_ranks is not None else int(row.get("ranks", 1))
    mode = args.mode or row.get("mode") or "weak"
    base = Base(
        ranks=ranks,
        compute_s=float(compute),
        data_s=0.0 if data is None or math.isnan(data) else float(data),
        grad_bytes=float(grad),
        global_batch=float(batch),
        mode=mode,
        overlap=args.overlap,
    )
    base.check()
    return base, row


def _refuse_pipeline_base(run: str, row: dict) -> None:
    """A pipeline run is not a base this model can extrapolate: its step has a bubble and
    point-to-point sends that a data-parallel scaling curve leaves out, so its figures
    would be wrong without saying so. The advisor models the pipeline."""
    pp = row.get("pp")
    if pp is not None and not math.isnan(pp) and int(pp) > 1:
        raise UsageError(
            f"--run {run}: a pipeline run (dist.pp = {int(pp)}); predict extrapolates "
            "data- and tensor-parallel runs: for pipeline layouts use scalelab predict --advise"
        )


def _measured(args: argparse.Namespace, run_row: dict, mode: str):
    """Measured (ranks, throughput, step time) medians to compare the prediction with."""
    import pandas as pd

    rows = []
    if args.measured:
        rows = runs.load_runs(args.measured)
    elif run_row:
        rows = [run_row]
    rows = _timed(rows)
    if args.measured_csv:
        rows += runs_csv.load_csv(args.measured_csv, mode)
    cols = ["ranks", "throughput", "step_time_s"]
    if not rows:
        return pd.DataFrame(columns=cols)
    frame = runs.to_frame(rows)
    frame = frame[frame["mode"] == mode]
    # a single process without a communication library is every backend's baseline
    single = (frame["backend"] == SINGLE) & (frame["ranks"] == 1)
    if args.backend:
        frame = frame[single | (frame["backend"] == args.backend)]
    elif frame.loc[~single, "backend"].nunique() > 1:
        names = ", ".join(sorted(frame.loc[~single, "backend"].unique()))
        raise UsageError(f"--measured: runs of several backends ({names}); pick one with --backend")
    frame = frame.assign(ranks=frame["workers"])
    return frame.groupby("ranks", as_index=False)[cols[1:]].median()


def _timed(rows: list[dict]) -> list[dict]:
    """The runs with a throughput; the others (no timed steps: every step was warm-up)
    are left out with one warning line, so one such point does not cost the prediction."""

    skipped = [r["run_id"] for r in rows if NO_TIMED_STEPS in str(r.get("flags", ""))]
    if skipped:
        print(
            f"scalelab predict: warning: left out {len(skipped)} run(s) with {NO_TIMED_STEPS} "
            f"(every step was warm-up, so no throughput to compare): {', '.join(skipped)}",
            file=sys.stderr,
        )
    return [r for r in rows if NO_TIMED_STEPS not in str(r.get("flags", ""))]
