"""Scaling plots (matplotlib, Agg): each figure is saved as PNG and SVG.

Every figure has the same pixel size (:data:`FIGSIZE` x :data:`DPI`), so the
Snakemake report lays them out evenly and tests can check a real image came out.
A figure whose data is absent (e.g. no time split in a published table) still
renders, with a note, so the set of output files never depends on the input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scalelab.analysis.columns import NO_SCHEDULE
from scalelab.analysis.scaling import GROUP, amdahl, gustafson

FIGSIZE = (8.0, 5.0)
DPI = 100
#: Plot names (file stems) in the order the report lists them.
NAMES = ("throughput", "efficiency", "breakdown", "fits", "backends", "memory")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Legend prefixes of the numeric group fields (``tp=2``, ``pp=2``, ``m=4``).
_PREFIX = {"tp": "tp", "pp": "pp", "microbatches": "m"}


def _field(name: str, value) -> str:
    if name == "recompute":
        return "recompute" if value else "no recompute"
    return f"{_PREFIX[name]}={value:g}" if name in _PREFIX else str(value)


def _labels(table: pd.DataFrame) -> dict[tuple, str]:
    """Short legend labels: only the group fields that differ between groups."""
    keys = list(table.groupby(GROUP, sort=True).groups)
    varying = [i for i in range(len(GROUP)) if len({k[i] for k in keys}) > 1] or [1, 2]
    return {
        k: " / ".join(_field(GROUP[i], k[i]) for i in varying if k[i] != NO_SCHEDULE) for k in keys
    }


def log2_x(ax, values, label=None, **tick_style) -> None:
    """A log2 x axis with a tick at each of ``values`` (labelled ``label(v)``, default
    ``f"{v:g}"``): worker counts and message sizes double, so equal steps read equally."""
    ax.set_xscale("log", base=2)
    ticks = np.unique(np.asarray(values))
    ax.set_xticks(ticks)
    ax.set_xticklabels([label(t) if label else f"{t:g}" for t in ticks], **tick_style)
    ax.minorticks_off()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def throughput(table: pd.DataFrame, threshold: float) -> object:
    """Throughput vs workers with min/max over repeats and the ideal (linear) line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    labels = _labels(table)
    for key, grp in table.groupby(GROUP, sort=True):
        grp = grp.sort_values("workers")
        err = np.vstack(
            [grp["throughput"] - grp["throughput_min"], grp["throughput_max"] - grp["throughput"]]
        )
        line = ax.errorbar(
            grp["workers"], grp["throughput"], yerr=err, marker="o", capsize=3, label=labels[key]
        )
        base = grp.iloc[0]
        ax.plot(
            grp["workers"],
            base["throughput"] * grp["workers"] / base["workers"],
            "--",
            color=line[0].get_color(),
            alpha=0.6,
            label=f"{labels[key]} (ideal)",
        )
    _throughput_axes(
        ax,
        table,
        "workers",
        "workers (GPUs, or ranks on CPU)",
        "Throughput vs scale (dashed: ideal linear scaling)",
        "small",
    )
    return fig


def _throughput_axes(
    ax: Any, table: pd.DataFrame, x: str, xlabel: str, title: str, legend: str
) -> None:
    """Log-2 scale axis, log throughput in the table's units, grid and legend."""
    log2_x(ax, table[x].to_numpy())
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    units = sorted(set(table["throughput_unit"]))
    ax.set_ylabel(f"throughput ({', '.join(units)})")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend)


def efficiency(table: pd.DataFrame, threshold: float) -> object:
    """Parallel efficiency vs workers with its spread, threshold line, sweet spot circled,
    flagged (superlinear) points crossed in red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    labels = _labels(table)
    for key, grp in table.groupby(GROUP, sort=True):
        grp = grp.sort_values("workers")
        err = None
        if "efficiency_spread" in grp:  # the spread's full width, centred, clipped at 0
            half = grp["efficiency"] * grp["efficiency_spread"].fillna(0) / 2
            err = np.vstack([np.minimum(half, grp["efficiency"]), half])
        ax.errorbar(
            grp["workers"], grp["efficiency"], yerr=err, marker="o", capsize=3, label=labels[key]
        )
        if "flag_superlinear" in grp:
            bad = grp[grp["flag_superlinear"].astype(bool)]
            ax.plot(
                bad["workers"],
                bad["efficiency"],
                "x",
                color="red",
                markersize=12,
                mew=2,
                label=None,
            )
            for row in bad.itertuples():
                ax.annotate(
                    "superlinear: anomaly",
                    (row.workers, row.efficiency),
                    textcoords="offset points",
                    xytext=(6, 6),
                    color="red",
                    fontsize="small",
                )
        spot = grp[grp["sweet_spot"]]
        ax.plot(
            spot["workers"], spot["efficiency"], "o", markersize=14, fillstyle="none", color="black"
        )
    ax.axhline(threshold, color="red", linestyle=":", label=f"threshold {threshold:g}")
    log2_x(ax, table["workers"].to_numpy())
    ax.set_ylim(0, max(1.1, float(table["efficiency"].max()) * 1.1))
    ax.set_xlabel("workers (GPUs, or ranks on CPU)")
    ax.set_ylabel("parallel efficiency  X_N / (p X_0)")
    ax.set_title("Parallel efficiency, bars: spread (circle: sweet spot; red x: superlinear)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def breakdown(table: pd.DataFrame, threshold: float) -> object:
    """Seconds per step split into data / compute / communication / other per configuration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    parts = ["data_s", "compute_s", "comm_s"]
    rows = table[table[parts].notna().any(axis=1)].sort_values([*GROUP, "workers", "nodes"])
    if rows.empty:
        _empty(
            ax,
            "no data / compute / communication time split in the input\n"
            "(published tables rarely have one)",
        )
        ax.set_title("Time per step breakdown")
        return fig
    names = [
        f"{r.backend}/{r.mode} {r.nodes:g}n x {r.ranks / r.nodes:g}r"
        + (" (comm in compute)" if np.isnan(r.comm_s) and r.ranks > 1 else "")
        for r in rows.itertuples()
    ]
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for col, colour in zip(parts, ("tab:orange", "tab:blue", "tab:red"), strict=True):
        vals = rows[col].fillna(0).to_numpy()
        ax.barh(y, vals, left=left, color=colour, label=col.removesuffix("_s"))
        left += vals
    other = np.clip(rows["step_time_s"].to_numpy() - left, 0, None)
    other = np.nan_to_num(other)
    if other.any():
        ax.barh(y, other, left=left, color="tab:gray", label="other")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize="small")
    ax.set_xlabel("seconds per step (median over repeats)")
    ax.set_title("Where the step time goes")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def fits(table: pd.DataFrame, threshold: float, fit_table: pd.DataFrame | None = None) -> object:
    """Measured speedup with the fitted Amdahl (solid) and Gustafson (dotted) curves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    labels = _labels(table)
    pmax = float(table["p"].max())
    grid = np.geomspace(1, max(pmax, 2.0), 100)
    ax.plot(grid, grid, color="gray", linestyle="--", label="ideal")
    for key, grp in table.groupby(GROUP, sort=True):
        pts = ax.plot(grp["p"], grp["speedup"], "o", label=f"{labels[key]} measured")
        colour = pts[0].get_color()
        row = None
        if fit_table is not None:
            match = fit_table
            for col, val in zip(GROUP, key, strict=True):
                match = match[match[col] == val]
            row = match.iloc[0] if len(match) else None
        for name, law, style in (("Amdahl", amdahl, "-"), ("Gustafson", gustafson, ":")):
            model = name.lower()
            if row is not None and np.isfinite(row[f"{model}_parallel_fraction"]):
                f = row[f"{model}_parallel_fraction"]
                ax.plot(
                    grid,
                    law(grid, f),
                    style,
                    color=colour,
                    label=f"{name} f={f:.4f}{_exact_note(row, model)}",
                )
    log2_x(ax, np.append(table["p"].to_numpy(), 1.0))
    ax.set_yscale("log", base=2)
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("relative scale p = N / N_0")
    ax.set_ylabel("speedup S = X_N / X_0")
    ax.set_title("Fitted scaling models over the measurements")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return fig


def _exact_note(row: pd.Series, model: str) -> str:
    """' (exact through N points)' for a fit with no spare point: its curve goes through
    the measurements by construction, which says nothing about the model's quality."""
    if not bool(row.get(f"{model}_exact", False)):
        return ""
    return f" (exact through {row['fit_points']:g} points)"


def backends(table: pd.DataFrame, threshold: float) -> object:
    """Backends (DDP, Horovod, ...) side by side: throughput and efficiency at each scale."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    series = {}
    for key, grp in table.groupby(GROUP, sort=True):
        where = dict(zip(GROUP, key, strict=True))
        name = (
            where["backend"] if table["mode"].nunique() == 1 else "{backend}/{mode}".format(**where)
        )
        for col in ("tp", "pp", "microbatches", "schedule", "recompute"):
            if table[col].nunique() > 1 and where[col] != NO_SCHEDULE:
                name = f"{name} {_field(col, where[col])}"
        if table["source"].nunique() > 1:
            name = f"{where['source']}: {name}"
        series[name] = grp.groupby("workers")[["throughput", "efficiency"]].max()
    scales = sorted({w for s in series.values() for w in s.index})
    x = np.arange(len(scales))
    width = 0.8 / max(len(series), 1)
    for i, (name, s) in enumerate(series.items()):
        s = s.reindex(scales)
        ax1.bar(x + i * width, s["throughput"], width, label=name)
        ax2.bar(x + i * width, s["efficiency"], width, label=name)
    for ax, title in ((ax1, "throughput"), (ax2, "parallel efficiency")):
        ax.set_xticks(x + width * (len(series) - 1) / 2)
        ax.set_xticklabels([f"{w:g}" for w in scales])
        ax.set_xlabel("workers")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    ax2.axhline(threshold, color="red", linestyle=":")
    ax1.legend(fontsize="x-small")
    fig.suptitle("Backends side by side")
    fig.tight_layout()
    return fig


def memory(table: pd.DataFrame, threshold: float) -> object:
    """Throughput (left) beside the state one rank holds (right), against world size:
    what sharding saves next to what it costs. Memory: rank 0's measured bytes."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    labels = _labels(table)
    mem = table[table["state_bytes_per_rank"].notna()]
    for key, grp in table.groupby(GROUP, sort=True):
        grp = grp.sort_values("ranks")
        ax1.plot(grp["ranks"], grp["throughput"], "o-", label=labels[key])
        held = grp[grp["state_bytes_per_rank"].notna()]
        if len(held):
            ax2.plot(
                held["ranks"],
                held["state_bytes_per_rank"] / 2**20,
                "o-",
                label=f"{labels[key]} total",
            )
            ax2.plot(
                held["ranks"],
                (held["param_bytes_per_rank"] + held["optim_state_bytes_per_rank"]) / 2**20,
                "x:",
                color=ax2.lines[-1].get_color(),
                label=f"{labels[key]} params+optimizer",
            )
    _throughput_axes(ax1, table, "ranks", "world size (ranks)", "throughput", "x-small")
    if mem.empty:
        _empty(
            ax2,
            "no per-rank state bytes in the input\n(runs made before they were "
            "measured, or published tables)",
        )
    else:
        log2_x(ax2, mem["ranks"].to_numpy())
        ax2.set_xlabel("world size (ranks)")
        ax2.set_ylabel("MiB held by rank 0")
        ax2.set_ylim(bottom=0)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize="x-small")
    ax2.set_title("state per rank (params, grads, optimizer)")
    fig.suptitle("Memory per rank beside throughput")
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[..., object]] = {
    "throughput": throughput,
    "efficiency": efficiency,
    "breakdown": breakdown,
    "fits": fits,
    "backends": backends,
    "memory": memory,
}


def save(fig, directory: Path, name: str) -> list[Path]:
    """Write ``name``.png and ``name``.svg at the fixed size; close the figure."""
    plt = pyplot()
    paths = [directory / f"{name}.png", directory / f"{name}.svg"]
    try:
        for path in paths:
            fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return paths


def write_all(
    table: pd.DataFrame, fit_table: pd.DataFrame, threshold: float, directory: Path
) -> list[Path]:
    """All scaling plots into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in NAMES:
        fig = fits(table, threshold, fit_table) if name == "fits" else PLOTS[name](table, threshold)
        out.extend(save(fig, directory, name))
    return out
