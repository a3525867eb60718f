"""Write the analysis: CSV, Parquet, Markdown, JSON and plots, all or nothing.

Output directory layout (every file always present, whatever the input)::

    runs.csv, runs.parquet         tidy per-run table (scalelab.analysis.columns.COLUMNS)
    scaling.csv, scaling.parquet   per configuration: repeats aggregated + scaling metrics
    fits.csv                       per group: Amdahl/Gustafson parallel fraction, sweet spot
    scaling.md                     Markdown tables for humans (flags beside the figures), the
                                   memory per rank and what sharding bought (vs ddp)
    scaling.html                   the same tables as one self-contained HTML page: the
                                   Snakemake report's view of the results
    analysis.json                  fits, sweet spots and memory_vs_ddp, machine-readable (not
                                   summary.json: that name marks a run directory)
    plots/{throughput,efficiency,breakdown,fits,backends,memory}.{png,svg}
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scalelab.analysis import plots
from scalelab.analysis.report_sections import (
    memory_columns,
    memory_comparisons,
    memory_table,
    recompute_comparisons,
    recompute_sentence,
    sharding_sentence,
    with_pipeline,
)
from scalelab.analysis.scaling import FLAG_K, FLAG_LEGEND
from scalelab.output_guard import atomic_dir

#: Characters with a meaning inside a Markdown table cell (links and images need '[').
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_escape(text: str) -> str:
    """Text safe inside Markdown (and the HTML it becomes): every Markdown control
    character backslash-escaped, then &, < and > as entities, so a label renders as
    written and can neither break a table nor open a tag."""
    return html.escape(_MD_SPECIAL.sub(r"\\\1", str(text)), quote=False)


def _fmt(value: Any, spec: str) -> str:
    """One cell as plain text (no markup): '-' for missing, 'yes' for True."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (int, float, np.integer, np.floating)):
        if spec == "num":
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return format(value, spec)
    return str(value)


def _exact_cell(row: pd.Series, column: str) -> str | None:
    """Words instead of a figure for the uncertainty and error of an exact fit."""
    model = column.split("_", 1)[0]
    if column not in (f"{model}_parallel_fraction_stderr", f"{model}_rms_rel_error") or not bool(
        row.get(f"{model}_exact", False)
    ):
        return None
    if column.endswith("_stderr"):
        return f"none: exact through {row['fit_points']:g} points"
    return "n/a (exact)"


def _cell(row: pd.Series, column: str, spec: str) -> str:
    """The text of one cell; the spread says 'n/a' where only one repeat ran, an exact
    fit says so instead of an uncertainty."""
    exact = _exact_cell(row, column)
    if exact is not None:
        return exact
    if column == "throughput_spread" and row.get("repeats", 2) < 2:
        return "n/a (1 repeat)" if row.get("repeats", 2) == 1 else "n/a (no timed steps)"
    if column == "efficiency" and row.get("flags"):
        return f"{_fmt(row[column], spec)} ({row['flags']})"
    return _fmt(row[column], spec)


def markdown_table(frame: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    """A GitHub Markdown table of ``(column, header, format spec)`` triples; every cell
    escaped, so a label can neither break the table nor inject HTML."""
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---:" if s else "---" for _, _, s in columns) + "|",
    ]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(md_escape(_cell(row, c, s)) for c, _, s in columns) + " |")
    return "\n".join(lines)


def html_table(frame: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    """The same table as HTML (every cell escaped); flagged efficiencies get a class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for col, _, spec in columns:
            text = html.escape(_cell(row, col, spec))
            anomaly = col == "efficiency" and bool(row.get("flag_superlinear", False))
            cls = ' class="anomaly"' if anomaly else (' class="num"' if spec else "")
            cells.append(f"<td{cls}>{'&#9888; ' if anomaly else ''}{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


SCALING_COLUMNS = [
    ("source", "source", ""),
    ("backend", "backend", ""),
    ("mode", "mode", ""),
    ("tp", "tp", "g"),
    ("nodes", "nodes", "g"),
    ("ranks", "ranks", "g"),
    ("gpus", "GPUs", "g"),
    ("repeats", "repeats", "d"),
    ("global_batch", "global batch", "g"),
    ("throughput", "throughput (median)", "num"),
    ("throughput_min", "min", "num"),
    ("throughput_max", "max", "num"),
    ("throughput_spread", "spread", ".1%"),
    ("epoch_time_s", "epoch time s", "num"),
    ("speedup", "speedup", ".3f"),
    ("efficiency", "efficiency (flags)", ".1%"),
    ("efficiency_spread", "+- spread", ".1%"),
    ("karp_flatt", "Karp-Flatt", ".4f"),
    ("marginal_gain_per_doubling", "gain/doubling", ".1%"),
    ("cost_per_epoch_h", "cost/epoch", ".3g"),
    ("cost_unit", "cost unit", ""),
    ("time_to_target_s", "time to target s", "num"),
    ("final_accuracy", "final acc", ".3f"),
    ("test_accuracy", "test acc", ".3f"),
    ("sweet_spot", "sweet spot", ""),
]

#: Columns shown only when some run has them, each before the column named beside it:
#: energy (most CPU nodes expose no readable counter), test perplexity (language models).
OPTIONAL_COLUMNS = [
    (("joules_per_sample", "J/sample", ".4g"), "epoch_time_s"),
    (("test_perplexity", "test ppl", ".4g"), "sweet_spot"),
]


def scaling_columns(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The scaling table's columns, with the optional ones that some row has."""
    cols = with_pipeline(table, SCALING_COLUMNS)
    for col, before in OPTIONAL_COLUMNS:
        if col[0] in table and table[col[0]].notna().any():
            cols.insert([c[0] for c in cols].index(before), col)
    return cols


FIT_COLUMNS = [
    ("source", "source", ""),
    ("backend", "backend", ""),
    ("mode", "mode", ""),
    ("tp", "tp", "g"),
    ("configurations", "configs", "d"),
    ("fit_points", "fitted", "d"),
    ("amdahl_parallel_fraction", "Amdahl f", ".5f"),
    ("amdahl_parallel_fraction_stderr", "+-", ".2g"),
    ("amdahl_rms_rel_error", "Amdahl rms rel err", ".2%"),
    ("gustafson_parallel_fraction", "Gustafson f", ".5f"),
    ("gustafson_parallel_fraction_stderr", "+-", ".2g"),
    ("gustafson_rms_rel_error", "Gustafson rms rel err", ".2%"),
    ("sweet_spot_workers", "sweet spot workers", "g"),
    ("sweet_spot_efficiency", "its efficiency", ".1%"),
]


#: What the fits table means, above it in scaling.md and scaling.html.
FIT_NOTE = (
    "Amdahl: S(p) = 1 / ((1 - f) + f / p); Gustafson: S(p) = (1 - f) + f p; f: fitted "
    "parallel fraction (least squares, relative residuals) over the configurations with "
    "a throughput ('fitted'). Both models pass through the baseline (p = 1, S = 1), so a "
    "series of two configurations leaves one free point for one parameter: the fit goes "
    "through it exactly, says 'exact through 2 points', and has no uncertainty and no "
    "error figure, because nothing was left over to measure them."
)


def flag_summary(table: pd.DataFrame) -> list[str]:
    """One line per flag that occurs: how many rows carry it, and what it means."""
    lines = []
    for code, meaning in FLAG_LEGEND.items():
        n = int(sum(code in f.split("; ") for f in table["flags"]))
        if n:
            lines.append(f"{code} ({n} of {len(table)} rows): {meaning}")
    return lines


def _intro(table: pd.DataFrame, threshold: float) -> str:
    units = ", ".join(sorted(set(table["throughput_unit"])))
    return (
        f"Throughput in {units}; speedup and efficiency relative to the smallest configuration "
        "of each source/backend/mode (efficiency = X_N / (p X_0), p = N / N_0, N = GPUs or "
        f"ranks on CPU). Sweet spot: largest scale with efficiency >= {threshold:g}. Spread: "
        "(max - min) / median over the repeats; the efficiency's spread r adds the point's and "
        f"the baseline's in quadrature. Flags (K = {FLAG_K:g}): efficiency > 1 + K r is "
        "'superlinear'. Definitions and sources: docs/analysis.md."
    )


def markdown(
    table: pd.DataFrame, fit_table: pd.DataFrame, threshold: float, inputs: Sequence[str]
) -> str:
    """The human-readable report; every label and path escaped."""
    flags = flag_summary(table)
    parts = [
        "# Scaling analysis",
        "",
        "Inputs: " + ", ".join(md_escape(i) for i in inputs),
        "",
        _intro(table, threshold),
        "",
        "## Configurations (repeats aggregated)",
        "",
        markdown_table(table, scaling_columns(table)),
        "",
        "Flags:" if flags else "Flags: none.",
        "",
        *[f"- {line}" for line in flags],
        "",
        "## Memory per rank",
        "",
        md_escape(sharding_sentence(table)),
        "",
        *([md_escape(sentence), ""] if (sentence := recompute_sentence(table)) else []),
        _memory_markdown(table),
        "",
        "## Model fits",
        "",
        md_escape(FIT_NOTE),
        "",
        markdown_table(fit_table, with_pipeline(fit_table, FIT_COLUMNS)),
        "",
        "## Plots",
        "",
    ]
    parts += [f"![{name}](plots/{name}.png)" for name in plots.NAMES]
    return "\n".join(parts) + "\n"


def _memory_markdown(table: pd.DataFrame) -> str:
    rows = memory_table(table)
    if rows.empty:
        return "(no run reports per-rank state bytes)"
    return markdown_table(rows, memory_columns(rows))


_CSS = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:90%}
th,td{border:1px solid #ccc;padding:2px 6px}td.num{text-align:right}
td.anomaly{background:#fdd;color:#900;font-weight:bold;text-align:right}"""


def html_page(
    table: pd.DataFrame, fit_table: pd.DataFrame, threshold: float, inputs: Sequence[str]
) -> str:
    """scaling.md's content as one self-contained HTML page (no scripts, no remote
    resources): what the Snakemake report shows for the scaling table."""
    flags = flag_summary(table)
    legend = "".join(f"<li>{html.escape(line)}</li>" for line in flags) or "<li>none</li>"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            "<title>Scaling analysis</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>Scaling analysis</h1>",
            "<p>Inputs: " + html.escape(", ".join(map(str, inputs))) + "</p>",
            f"<p>{html.escape(_intro(table, threshold))}</p>",
            "<h2>Configurations (repeats aggregated)</h2>",
            html_table(table, scaling_columns(table)),
            f'<h2>Flags</h2><ul id="flags">{legend}</ul>',
            "<h2>Memory per rank</h2>",
            f'<p id="sharding">{html.escape(sharding_sentence(table))}</p>',
            *(
                [f'<p id="recompute">{html.escape(sentence)}</p>']
                if (sentence := recompute_sentence(table))
                else []
            ),
            html_table(memory_table(table), memory_columns(memory_table(table))),
            "<h2>Model fits</h2>",
            f"<p>{html.escape(FIT_NOTE)}</p>",
            html_table(fit_table, with_pipeline(fit_table, FIT_COLUMNS)),
            "</body></html>",
            "",
        ]
    )


def _jsonable(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def write(
    out: str | Path,
    runs: pd.DataFrame,
    table: pd.DataFrame,
    fit_table: pd.DataFrame,
    threshold: float,
    inputs: Sequence[str],
) -> Path:
    """Write every output into ``out`` atomically; return ``out``."""
    out = Path(out)
    with atomic_dir(out, "analysis", inputs) as tmp:
        runs.to_csv(tmp / "runs.csv", index=False)
        runs.to_parquet(tmp / "runs.parquet", index=False)
        table.to_csv(tmp / "scaling.csv", index=False)
        table.to_parquet(tmp / "scaling.parquet", index=False)
        fit_table.to_csv(tmp / "fits.csv", index=False)
        (tmp / "scaling.md").write_text(markdown(table, fit_table, threshold, inputs))
        (tmp / "scaling.html").write_text(html_page(table, fit_table, threshold, inputs))
        summary = {
            "threshold": threshold,
            "inputs": list(inputs),
            "fits": _jsonable(fit_table),
            "flag_k": FLAG_K,
            "flags": flag_summary(table),
            "memory_vs_ddp": memory_comparisons(table),
            "sharding": sharding_sentence(table),
            "recompute": recompute_comparisons(table),
            "recompute_sentence": recompute_sentence(table),
        }
        (tmp / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
        plots.write_all(table, fit_table, threshold, tmp / "plots")
    return out
