"""Write the analysis: CSV, Parquet, Markdown, JSON and plots, all or nothing.

Output directory layout (every file always present, whatever the input)::

    runs.csv, runs.parquet         tidy per-run table (scalelab.analysis.runs.COLUMNS)
    scaling.csv, scaling.parquet   per configuration: repeats aggregated + scaling metrics
    fits.csv                       per group: Amdahl/Gustafson parallel fraction, sweet spot
    scaling.md                     Markdown tables for humans and the Snakemake report
    analysis.json                  fits and sweet spots, machine-readable (not summary.json:
                                   that name marks a run directory)
    plots/{throughput,efficiency,breakdown,fits,backends}.{png,svg}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from scalelab.analysis import plots
from scalelab.fsio import atomic_dir


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, bool):
        return "**yes**" if value else ""
    if isinstance(value, (int, float)):
        if spec == "num":
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return format(value, spec)
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    """A GitHub Markdown table of ``(column, header, format spec)`` triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if s else "---" for _, _, s in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], s) for c, _, s in columns) + " |")
    return "\n".join(lines)


SCALING_COLUMNS = [
    ("source", "source", ""), ("backend", "backend", ""), ("mode", "mode", ""),
    ("nodes", "nodes", "g"), ("ranks", "ranks", "g"), ("gpus", "GPUs", "g"),
    ("repeats", "repeats", "d"), ("global_batch", "global batch", "g"),
    ("throughput", "throughput (median)", "num"), ("throughput_min", "min", "num"),
    ("throughput_max", "max", "num"), ("throughput_spread", "spread", ".1%"),
    ("epoch_time_s", "epoch time s", "num"), ("speedup", "speedup", ".3f"),
    ("efficiency", "efficiency", ".1%"), ("karp_flatt", "Karp-Flatt", ".4f"),
    ("marginal_gain_per_doubling", "gain/doubling", ".1%"),
    ("cost_per_epoch_h", "cost/epoch", ".3g"), ("cost_unit", "cost unit", ""),
    ("time_to_target_s", "time to target s", "num"), ("final_accuracy", "final acc", ".3f"),
    ("test_accuracy", "test acc", ".3f"), ("sweet_spot", "sweet spot", ""),
]

FIT_COLUMNS = [
    ("source", "source", ""), ("backend", "backend", ""), ("mode", "mode", ""),
    ("configurations", "configs", "d"),
    ("amdahl_parallel_fraction", "Amdahl f", ".5f"),
    ("amdahl_parallel_fraction_stderr", "+-", ".2g"),
    ("amdahl_rms_rel_error", "Amdahl rms rel err", ".2%"),
    ("gustafson_parallel_fraction", "Gustafson f", ".5f"),
    ("gustafson_parallel_fraction_stderr", "+-", ".2g"),
    ("gustafson_rms_rel_error", "Gustafson rms rel err", ".2%"),
    ("sweet_spot_workers", "sweet spot workers", "g"),
    ("sweet_spot_efficiency", "its efficiency", ".1%"),
]


def markdown(table: pd.DataFrame, fit_table: pd.DataFrame, threshold: float,
             inputs: Sequence[str]) -> str:
    """The human-readable report."""
    units = ", ".join(sorted(set(table["throughput_unit"])))
    parts = [
        "# Scaling analysis",
        "",
        "Inputs: " + ", ".join(f"`{i}`" for i in inputs),
        "",
        f"Throughput in {units}; speedup and efficiency relative to the smallest configuration "
        "of each source/backend/mode (efficiency = X_N / (p X_0), p = N / N_0, N = GPUs or "
        f"ranks on CPU). Sweet spot: largest scale with efficiency >= {threshold:g}. "
        "Definitions and sources: docs/analysis.md.",
        "",
        "## Configurations (repeats aggregated)",
        "",
        markdown_table(table, SCALING_COLUMNS),
        "",
        "## Model fits",
        "",
        "Amdahl: S(p) = 1 / ((1 - f) + f / p); Gustafson: S(p) = (1 - f) + f p; "
        "f: fitted parallel fraction (least squares, relative residuals).",
        "",
        markdown_table(fit_table, FIT_COLUMNS),
        "",
        "## Plots",
        "",
    ]
    parts += [f"![{name}](plots/{name}.png)" for name in plots.NAMES]
    return "\n".join(parts) + "\n"


def _jsonable(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def write(out: str | Path, runs: pd.DataFrame, table: pd.DataFrame, fit_table: pd.DataFrame,
          threshold: float, inputs: Sequence[str]) -> Path:
    """Write every output into ``out`` atomically; return ``out``."""
    out = Path(out)
    with atomic_dir(out, "analysis", inputs) as tmp:
        runs.to_csv(tmp / "runs.csv", index=False)
        runs.to_parquet(tmp / "runs.parquet", index=False)
        table.to_csv(tmp / "scaling.csv", index=False)
        table.to_parquet(tmp / "scaling.parquet", index=False)
        fit_table.to_csv(tmp / "fits.csv", index=False)
        (tmp / "scaling.md").write_text(markdown(table, fit_table, threshold, inputs))
        summary = {"threshold": threshold, "inputs": list(inputs), "fits": _jsonable(fit_table)}
        (tmp / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
        plots.write_all(table, fit_table, threshold, tmp / "plots")
    return out
