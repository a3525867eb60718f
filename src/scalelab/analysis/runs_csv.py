"""Map a published-style CSV table (GPUs or ranks, throughput or time) onto the run columns."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from scalelab.analysis.columns import MEMORY_KEYS, NAN, check_label
from scalelab.analysis.runs import pipeline_columns
from scalelab.errors import UsageError

#: Accepted CSV headers (case-insensitive; spaces and dashes read as underscores).
CSV_ALIASES: dict[str, tuple[str, ...]] = {
    "gpus": ("gpus", "gpu", "num_gpus"),
    "ranks": ("ranks", "processes", "world_size", "workers"),
    "throughput": ("throughput", "samples_per_s", "images_per_s", "samples/s", "images/s"),
    "time": ("time", "time_s", "seconds", "epoch_time_s"),
    "nodes": ("nodes",),
    "mode": ("mode",),
    "backend": ("backend",),
    "label": ("label", "source"),
    "global_batch": ("global_batch", "batch", "global_batch_size"),
    "final_accuracy": ("accuracy", "final_accuracy"),
    "epoch_samples": ("epoch_samples",),
    "cores_per_rank": ("cores_per_rank",),
    "repeat": ("repeat",),
    "tp": ("tp", "tensor_parallel"),
    "pp": ("pp", "pipeline_parallel"),
    "microbatches": ("microbatches", "micro_batches"),
    "virtual_stages": ("virtual_stages",),
    "schedule": ("schedule",),
}


def _norm(header: str) -> str:
    return header.strip().lower().replace(" ", "_").replace("-", "_")


class _Table:
    """A published-style CSV: its path and which of its headers maps to which column."""

    def __init__(self, path: Path, cols: dict[str, str]) -> None:
        self.path, self.cols = path, cols

    def text(self, raw: dict, key: str) -> str:
        return (raw.get(self.cols[key]) or "").strip() if key in self.cols else ""

    def number(
        self, raw: dict, key: str, lineno: int, required: bool, positive: bool = True
    ) -> float:
        """The cell as a finite number (> 0, or >= 0); NaN when absent and not required."""
        if key not in self.cols:
            return NAN
        col = self.cols[key]
        value = (raw.get(col) or "").strip()
        if not value:
            if required:
                raise UsageError(f"{self.path}: line {lineno}: column '{col}' is empty")
            return NAN
        try:
            x = float(value)
        except ValueError:
            raise UsageError(
                f"{self.path}: line {lineno}: column '{col}': {value!r} is not a number"
            ) from None
        if not math.isfinite(x) or (x <= 0 if positive else x < 0):
            raise UsageError(
                f"{self.path}: line {lineno}: column '{col}': {value} must be "
                f"{'> 0' if positive else '>= 0'}"
            )
        return x

    def default(
        self, raw: dict, key: str, lineno: int, value: float, positive: bool = True
    ) -> float:
        x = self.number(raw, key, lineno, False, positive)
        return value if math.isnan(x) else x


def _csv_columns(path: Path, fieldnames: list[str] | None) -> dict[str, str]:
    headers = {_norm(h): h for h in (fieldnames or []) if h is not None}
    cols: dict[str, str] = {}
    for key, aliases in CSV_ALIASES.items():
        found = next((headers[a] for a in aliases if a in headers), None)
        if found is not None:
            cols[key] = found
    if "gpus" not in cols and "ranks" not in cols:
        raise UsageError(
            f"{path}: missing column: need 'gpus' or 'ranks' "
            f"(found: {', '.join(headers.values()) or 'no header'})"
        )
    if "throughput" not in cols and "time" not in cols:
        raise UsageError(
            f"{path}: missing column: need 'throughput' (samples/s) or 'time' "
            f"(seconds) (found: {', '.join(headers.values())})"
        )
    return cols


def _csv_times(t: _Table, raw: dict, lineno: int) -> tuple[float, float, float]:
    """(throughput, time, epoch samples) cells of one row, NaN where absent."""
    tput = t.number(raw, "throughput", lineno, "time" not in t.cols)
    time_s = t.number(raw, "time", lineno, "throughput" not in t.cols or math.isnan(tput))
    return tput, time_s, t.number(raw, "epoch_samples", lineno, False)


def _csv_throughput(
    cells: tuple[float, float, float], mode: str, workers: float
) -> tuple[float, str, float]:
    """(throughput, unit, epoch time) of one row: given, or derived from a time column."""
    tput, time_s, epoch_samples = cells
    epoch_time = time_s
    if math.isnan(epoch_time) and not math.isnan(epoch_samples):
        epoch_time = epoch_samples / tput
    if not math.isnan(tput):
        return tput, "samples/s", epoch_time
    work = workers if mode == "weak" else 1.0
    if not math.isnan(epoch_samples):
        return work * epoch_samples / time_s, "samples/s", epoch_time
    return work / time_s, "work/s", epoch_time


def _csv_row(t: _Table, raw: dict, lineno: int, mode: str | None) -> dict[str, Any]:
    gpus = t.number(raw, "gpus", lineno, True)
    ranks = t.number(raw, "ranks", lineno, True)
    cells = _csv_times(t, raw, lineno)
    row_mode = t.text(raw, "mode").lower() or mode or "strong"
    if row_mode not in ("strong", "weak"):
        raise UsageError(
            f"{t.path}: line {lineno}: column '{t.cols.get('mode', 'mode')}': "
            f"{row_mode!r} is not 'strong' or 'weak'"
        )
    workers = gpus if not math.isnan(gpus) else ranks
    throughput, unit, epoch_time = _csv_throughput(cells, row_mode, workers)
    label, backend = t.text(raw, "label"), t.text(raw, "backend")
    for key, value in (("label", label), ("backend", backend)):
        check_label(value, f"{t.path}: line {lineno}: column '{t.cols.get(key, key)}'")
    return {
        "source": label or t.path.stem,
        "run_id": f"{t.path.name}:{lineno}",
        "backend": backend or "external",
        "mode": row_mode,
        "nodes": t.default(raw, "nodes", lineno, 1.0),
        "ranks": ranks if not math.isnan(ranks) else gpus,
        "gpus": 0.0 if math.isnan(gpus) else gpus,
        "workers": workers,
        "cores_per_rank": t.default(raw, "cores_per_rank", lineno, 1.0),
        "repeat": t.default(raw, "repeat", lineno, 0.0, positive=False),
        "global_batch": t.number(raw, "global_batch", lineno, False),
        "samples_per_s": throughput if unit == "samples/s" else NAN,
        "throughput": throughput,
        "throughput_unit": unit,
        "epoch_time_s": epoch_time,
        "step_time_s": NAN,
        "data_s": NAN,
        "compute_s": NAN,
        "comm_s": NAN,
        "final_accuracy": t.number(raw, "final_accuracy", lineno, False, positive=False),
        "time_to_target_s": NAN,
        "grad_bytes": NAN,
        "tp": t.default(raw, "tp", lineno, 1.0),
        **_csv_pipeline(t, raw, lineno),
        **{col: NAN for col in MEMORY_KEYS},
        "provenance": f"{t.path.resolve()}:{lineno}",
        "flags": "",
    }


def _csv_pipeline(t: _Table, raw: dict, lineno: int) -> dict[str, Any]:
    """pp, microbatches, schedule and bubble of one row (no pipeline where it has no pp)."""
    counts = {
        key: None if math.isnan(x := t.number(raw, key, lineno, False)) else x
        for key in ("pp", "microbatches", "virtual_stages")
    }
    where = f"{t.path}: line {lineno}"
    cols = pipeline_columns(
        counts["pp"],
        counts["microbatches"],
        counts["virtual_stages"],
        t.text(raw, "schedule") or None,
        where,
    )
    return {**cols, "recompute": False}


def load_csv(path: str | Path, mode: str | None = None) -> list[dict[str, Any]]:
    """Rows of a published-style table: (GPUs or ranks, throughput or time) plus optional columns.

    ``mode`` (strong/weak) applies where the table has no mode column. With a
    time column only, throughput is work per second: 1/time for strong scaling
    (fixed total work), workers/time for weak scaling (work grows with N);
    ``epoch_samples`` turns either into samples/s.
    """
    path = Path(path)
    check_label(path.name, f"{path}: file name (it labels the rows: source, run_id)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    table = _Table(path, _csv_columns(path, reader.fieldnames))
    rows = [
        _csv_row(table, raw, lineno, mode)
        for lineno, raw in enumerate(reader, 2)
        if any((v or "").strip() for v in raw.values() if isinstance(v, str))
    ]
    if not rows:
        raise UsageError(f"{path}: no data rows")
    return rows
