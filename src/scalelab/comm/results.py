"""Commbench outputs: JSON lines, CSV, Markdown table, plot and run metadata.

Written by rank 0 only, atomically (see :func:`scalelab.output_guard.atomic_dir`)::

    commbench.jsonl   one record per (op, size): the columns of :data:`FIELDS`
    commbench.csv     the same records
    commbench.md      Markdown table
    commbench.png/svg busbw and time vs message size
    meta.json         library, backend, ranks, nodes, hosts, launcher, versions, command
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from scalelab.errors import UsageError
from scalelab.output_guard import atomic_dir

FIELDS = [
    "lib",
    "backend",
    "op",
    "size_bytes",
    "count",
    "dtype",
    "world_size",
    "nodes",
    "iters",
    "warmup",
    "time_s",
    "time_max_s",
    "algbw_GBps",
    "busbw_GBps",
    "wrong",
]
FIGSIZE = (10.0, 4.5)
DPI = 100


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# commbench: {meta['lib']} ({meta['backend']}), {meta['world_size']} ranks on "
        f"{meta['nodes']} node(s)",
        "",
        "time: mean over ranks of the mean over iterations; GB/s = 1e9 B/s; busbw by the "
        "nccl-tests definitions (allreduce x 2(n-1)/n, allgather x (n-1)/n, broadcast x 1).",
        "",
        "| op | size (B) | time (us) | algbw (GB/s) | busbw (GB/s) | #wrong |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        wrong = "N/A" if r["wrong"] < 0 else r["wrong"]
        lines.append(
            f"| {r['op']} | {r['size_bytes']} | {r['time_s'] * 1e6:.1f} | "
            f"{r['algbw_GBps']:.4f} | {r['busbw_GBps']:.4f} | {wrong} |"
        )
    return "\n".join(lines) + "\n"


def human_bytes(n: float) -> str:
    """1024 -> '1K', 268435456 -> '256M' (binary units, as the CLI takes them)."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def plot(records: list[dict], meta: dict, directory: Path) -> None:
    from scalelab.analysis.plots import log2_x, pyplot, save

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    for op in dict.fromkeys(r["op"] for r in records):
        rows = [r for r in records if r["op"] == op]
        x = [r["size_bytes"] for r in rows]
        ax1.plot(x, [r["busbw_GBps"] for r in rows], marker="o", label=op)
        ax2.plot(x, [r["time_s"] * 1e6 for r in rows], marker="o", label=op)
    sizes = sorted({r["size_bytes"] for r in records})
    ticks = [s for s in sizes if math.log2(s) % 2 == 0] or sizes
    for ax in (ax1, ax2):
        log2_x(ax, ticks, human_bytes, fontsize="x-small", rotation=45)
        ax.set_xlabel("message size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax1.set_ylabel("busbw (GB/s)")
    ax2.set_ylabel("time per call (us)")
    ax2.set_yscale("log")
    fig.suptitle(
        f"commbench {meta['lib']} ({meta['backend']}), {meta['world_size']} ranks, "
        f"{meta['nodes']} node(s)"
    )
    fig.tight_layout()
    save(fig, directory, "commbench")


def write(out: str | Path, records: list[dict], meta: dict) -> Path:
    """All commbench outputs into ``out``, atomically (only over an earlier commbench)."""
    out = Path(out)
    with atomic_dir(out, "commbench") as tmp:
        with open(tmp / "commbench.jsonl", "w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        with open(tmp / "commbench.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(records)
        (tmp / "commbench.md").write_text(markdown(records, meta))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        plot(records, meta, tmp)
    return out


def read(path: str | Path) -> list[dict[str, Any]]:
    """Records of a commbench output (its directory, .csv or .jsonl), validated.

    Only the columns the prediction needs are required: op, size_bytes,
    time_s, world_size (and nodes, defaulting to 1).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "commbench.csv"
    if not path.is_file():
        raise UsageError(f"{path}: no such commbench result (give its directory, .csv or .jsonl)")
    text = path.read_text()
    if path.suffix == ".jsonl":
        try:
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON lines: {exc}") from None
    else:
        raw = list(csv.DictReader(text.splitlines()))
    if not raw:
        raise UsageError(f"{path}: no records")
    required = ("op", "size_bytes", "time_s", "world_size")
    records = []
    for i, rec in enumerate(raw, 2 if path.suffix != ".jsonl" else 1):
        missing = [c for c in required if c not in rec]
        if missing:
            raise UsageError(f"{path}: missing column '{missing[0]}'")
        out = dict(rec)
        for col in ("size_bytes", "time_s", "world_size", "nodes"):
            if col == "nodes" and rec.get(col) in (None, ""):
                out[col] = 1.0
                continue
            try:
                out[col] = float(rec[col])
            except (TypeError, ValueError):
                raise UsageError(
                    f"{path}: line {i}: column '{col}': {rec[col]!r} is not a number"
                ) from None
            if not (math.isfinite(out[col]) and out[col] > 0):
                raise UsageError(f"{path}: line {i}: column '{col}': {rec[col]} must be > 0")
        records.append(out)
    return records
