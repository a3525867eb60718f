"""Outputs of ``scalelab predict``, written atomically::

prediction.csv     per rank count: compute, data, allreduce, step time, throughput, efficiency
errors.csv         prediction error at the measured rank counts
prediction.md      the model, fitted alpha/beta, base configuration, both tables
prediction.json    the same, machine-readable
prediction.png/svg throughput and efficiency vs ranks, measured points on top
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from scalelab.analysis.plots import log2_x, pyplot, save
from scalelab.analysis.report import markdown_table
from scalelab.backends.registry import DEFAULT
from scalelab.comm.predict import MODEL, Base, RingFit, fit_dict
from scalelab.output_guard import atomic_dir

FIGSIZE = (10.0, 4.5)
DPI = 100

PRED_COLUMNS = [
    ("ranks", "ranks", "g"),
    ("global_batch", "global batch", "g"),
    ("compute_s", "compute ms", "num_ms"),
    ("data_s", "data ms", "num_ms"),
    ("allreduce_s", "allreduce ms", "num_ms"),
    ("all_gather_s", "all-gather ms", "num_ms"),
    ("reduce_scatter_s", "reduce-scatter ms", "num_ms"),
    ("step_time_s", "step ms", "num_ms"),
    ("throughput", "samples/s", "num"),
    ("speedup", "speedup", ".2f"),
    ("efficiency", "efficiency", ".1%"),
]
ERROR_COLUMNS = [
    ("ranks", "ranks", "g"),
    ("measured_throughput", "measured samples/s", "num"),
    ("predicted_throughput", "predicted", "num"),
    ("throughput_rel_error", "error", "+.1%"),
    ("measured_step_time_s", "measured step ms", "num_ms"),
    ("predicted_step_time_s", "predicted", "num_ms"),
    ("step_time_rel_error", "error", "+.1%"),
]


def _table(frame: pd.DataFrame, columns: list[tuple[str, str, str]]) -> str:
    frame = frame.copy()
    cols = []
    for col, head, spec in columns:
        if spec == "num_ms":
            frame[col] = frame[col] * 1e3
            spec = "num"
        cols.append((col, head, spec))
    return markdown_table(frame, cols)


def markdown(pred: pd.DataFrame, errors: pd.DataFrame, base: Base, fit: RingFit) -> str:
    backend = pred.attrs.get("backend", DEFAULT)
    lines = [
        f"# Scaling prediction ({backend}: ring model of its collectives)",
        "",
        "Model: `" + MODEL + "`",
        "",
        *(
            [
                f"Collectives: {pred.attrs['comm']}; all-gather and reduce-scatter cost "
                "(n-1) alpha + (n-1)/n S/beta, S the unsharded buffer.",
                "",
            ]
            if "comm" in pred.attrs
            else []
        ),
        f"Fitted on {fit.points} allreduce sizes at world size(s) "
        f"{', '.join(map(str, fit.world_sizes))}: " + _fit_text(fit),
        "",
        f"Base configuration: {base.ranks} rank(s), {base.mode} scaling, compute "
        f"{base.compute_s * 1e3:.3f} ms + data {base.data_s * 1e3:.3f} ms per step, gradients "
        f"{base.grad_bytes / 2**20:.2f} MiB, global batch {base.global_batch:g}, "
        f"overlap {base.overlap:g}.",
        "",
        "## Prediction",
        "",
        _table(pred, PRED_COLUMNS),
        "",
        "## Error at measured points",
        "",
        _table(errors, ERROR_COLUMNS) if len(errors) else "(no measured points given)",
        "",
        "![prediction](prediction.png)",
    ]
    return "\n".join(lines) + "\n"


def bound_warning(fit: RingFit) -> str:
    """One line saying why beta is only a lower bound and what to measure instead."""
    lo, hi = fit.size_range
    return (
        f"the allreduce time does not grow measurably with the message size over "
        f"{lo:.0f}-{hi:.0f} B (latency and noise dominate), so beta is a lower bound (the "
        f"best bus bandwidth measured) and predicted communication times are upper bounds; "
        f"measure larger sizes (commbench --max-bytes) or more iterations to resolve it"
    )


def _fit_text(fit: RingFit) -> str:
    alpha = f"alpha = {fit.alpha_s * 1e6:.3f} us"
    if fit.beta_is_lower_bound:
        return (
            f"{alpha}, **beta >= {fit.beta_Bps / 1e9:.4f} GB/s (not resolved)**: "
            f"{bound_warning(fit)}."
        )
    return (
        f"{alpha} (+- {fit.alpha_stderr_s * 1e6:.2g}), beta = {fit.beta_Bps / 1e9:.4f} "
        f"GB/s (+- {fit.beta_stderr_Bps / 1e9:.2g}); relative fit error rms "
        f"{fit.rms_rel_error:.1%}, max {fit.max_rel_error:.1%}."
    )


def plot(pred: pd.DataFrame, measured: pd.DataFrame, base: Base, directory: Path) -> None:

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    x0 = float(pred.loc[pred["ranks"] == base.ranks, "throughput"].iloc[0])
    ax1.plot(pred["ranks"], pred["throughput"], "-", label="predicted")
    ax1.plot(pred["ranks"], x0 * pred["ranks"] / base.ranks, "--", color="gray", label="ideal")
    ax2.plot(pred["ranks"], pred["efficiency"], "-", label="predicted")
    if len(measured):
        ax1.plot(measured["ranks"], measured["throughput"], "o", color="black", label="measured")
        ax2.plot(
            measured["ranks"],
            measured["throughput"] / (x0 * measured["ranks"] / base.ranks),
            "o",
            color="black",
            label="measured",
        )
    for ax in (ax1, ax2):
        log2_x(ax, pred["ranks"], fontsize="x-small", rotation=45)
        ax.set_xlabel("ranks (GPUs)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax1.set_yscale("log")
    ax1.set_ylabel("samples/s")
    ax2.set_ylabel("efficiency vs predicted base")
    ax2.set_ylim(0, 1.1)
    bound = bool(pred["comm_s_is_upper_bound"].any())
    fig.suptitle(
        f"Predicted {base.mode} scaling of {pred.attrs.get('backend', DEFAULT)} "
        f"(ring model, {base.grad_bytes / 2**20:.1f} MiB gradients)"
        + ("\nbandwidth not resolved: efficiencies are lower bounds" if bound else "")
    )
    fig.tight_layout()
    save(fig, directory, "prediction")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def inputs_of(args: argparse.Namespace) -> list[str]:
    """Every path ``predict`` reads: its --out may be none of them, nor contain one."""
    paths = [args.commbench, args.run, args.measured_csv, *args.measured]
    return [str(p) for p in paths if p]


def write(
    out: str | Path,
    pred: pd.DataFrame,
    errors: pd.DataFrame,
    measured: pd.DataFrame,
    base: Base,
    fit: RingFit,
    args: argparse.Namespace,
) -> Path:
    out = Path(out)
    with atomic_dir(out, "predict", inputs_of(args)) as tmp:
        pred.to_csv(tmp / "prediction.csv", index=False)
        errors.to_csv(tmp / "errors.csv", index=False)
        (tmp / "prediction.md").write_text(markdown(pred, errors, base, fit))
        doc = {
            "model": MODEL,
            "collectives": pred.attrs.get("comm"),
            "collective_grad_bytes": pred.attrs.get("grad_bytes"),
            "fit": {k: _clean(v) for k, v in fit_dict(fit).items()},
            "base": asdict(base),
            "commbench": str(args.commbench),
            "prediction": json.loads(pred.to_json(orient="records")),
            "errors": json.loads(errors.to_json(orient="records")),
        }
        (tmp / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
        plot(pred, measured, base, tmp)
    return out
