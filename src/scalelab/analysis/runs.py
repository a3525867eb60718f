"""Turn run directories and external CSV tables into one tidy table.

:func:`load_run` is the ONLY place that knows the trainer's and the workflow's
file formats (``summary.json``, ``config.yaml``, ``metrics.jsonl``,
``sweep.json``); everything downstream sees the columns of :data:`COLUMNS`.
:func:`~scalelab.analysis.runs_csv.load_csv` maps a published-style table onto the same
columns, so runs and published numbers can be analysed side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scalelab.analysis.columns import (
    COLUMNS,
    ENERGY_KEYS,
    MEMORY_KEYS,
    NAN,
    NO_SCHEDULE,
    NO_TIMED_STEPS,
    NUMERIC,
    WORLD_SIZE_CHANGED,
    check_label,
)
from scalelab.backends.config import DistConfig
from scalelab.backends.pipeline_rules import bubble_fraction
from scalelab.errors import UsageError
from scalelab.models import build_model
from scalelab.rundir import RunDir

# --------------------------------------------------------------------------- run directories


def _dig(tree: Mapping[str, Any], *paths: str) -> Any:
    """First present, non-null value among dotted ``paths`` in a nested mapping."""
    for dotted in paths:
        node: Any = tree
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def _num(value: Any, where: str) -> float:
    """A finite float, NaN for missing; anything else is a broken file."""
    if value is None:
        return NAN
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _run_files(run_dir: Path) -> dict[str, Any]:
    """Every file of a run directory that :func:`load_run` reads, parsed."""
    rd = RunDir(run_dir)
    return {
        "summary": rd.summary(),
        "info": rd.run_info(),
        "sweep": rd.sweep(),
        "config": rd.config(),
        "records": list(rd.metrics()),
    }


def _gpus(summary: dict, sweep: dict, ranks: float, where: Path) -> float:
    if not str(_dig(summary, "device") or "cpu").startswith("cuda"):
        return 0.0
    per_task = _num(_dig(sweep, "gpus_per_task"), f"{where}: gpus_per_task")
    return ranks * (per_task if per_task > 0 else 1.0)


def _epoch_columns(
    records: list[dict], steps_per_epoch: float, target_accuracy: float | None
) -> dict[str, float]:
    """Per-step times, median epoch time and time-to-target from the epoch records
    (the first epoch left out of the timings when there are several, as the trainer does)."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    timed = epochs[1:] if len(epochs) > 1 else epochs
    steps = steps_per_epoch * len(timed)

    def per_step(key: str) -> float:
        vals = [r.get(key) for r in timed]
        if not vals or any(v is None for v in vals) or not steps > 0:
            return NAN
        return float(sum(vals)) / steps

    epoch_times = sorted(float(r["time_s"]) for r in timed if r.get("time_s") is not None)
    val = [r["val_acc"] for r in epochs if r.get("val_acc") is not None]
    return {
        "epoch_time_s": epoch_times[len(epoch_times) // 2] if epoch_times else NAN,
        "data_s": per_step("data_s"),
        "compute_s": per_step("compute_s"),
        "comm_s": per_step("comm_s"),
        "last_val_acc": val[-1] if val else None,
        "time_to_target_s": _time_to_target(epochs, target_accuracy),
    }


def _time_to_target(epochs: list[dict], target_accuracy: float | None) -> float:
    if target_accuracy is None:
        return NAN
    elapsed = 0.0
    for rec in epochs:
        elapsed += float(rec.get("time_s") or 0.0)
        if rec.get("val_acc") is not None and rec["val_acc"] >= target_accuracy:
            return elapsed
    return NAN


def _grad_bytes(summary: dict, config: dict, s: str, count_params: bool) -> float:
    """From the summary (``grad_bytes``, else 4 x ``num_params``); only for runs whose
    summary predates both does ``count_params`` rebuild the model from config.yaml."""
    grad_bytes = _num(_dig(summary, "grad_bytes"), f"{s}: grad_bytes")
    if math.isnan(grad_bytes) and _dig(summary, "num_params") is not None:
        grad_bytes = 4.0 * _num(_dig(summary, "num_params"), f"{s}: num_params")
    if math.isnan(grad_bytes) and count_params and config:
        model = build_model(
            _dig(config, "model.name") or "cnn",
            int(_dig(config, "data.num_classes") or 10),
            tuple(_dig(config, "data.image_shape") or (3, 32, 32)),
            **(_dig(config, "model.options") or {}),
        )
        grad_bytes = 4.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return grad_bytes


def _provenance(summary: dict, run_dir: Path) -> str:
    ident = _dig(summary, "provenance.id", "provenance_id")
    if ident is not None:
        return ident
    import hashlib

    digest = hashlib.sha256()
    rd = RunDir(run_dir)
    for path in (rd.config_path, rd.run_info_path, rd.summary_path):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _labels(run_dir: Path, summary: dict, sweep: dict, mode: str) -> dict[str, str]:
    """run_id, backend and mode: from sweep.json, else the directory and the summary."""
    s, sweep_path = str(RunDir(run_dir).summary_path), RunDir(run_dir).sweep_path
    run_id = _dig(sweep, "run_id")
    run_id = (
        check_label(run_id, f"{sweep_path}: field 'run_id'")
        if run_id is not None
        else check_label(run_dir.name, f"{run_dir}: directory name")
    )
    backend = _dig(sweep, "backend")
    backend = (
        check_label(backend, f"{sweep_path}: field 'backend'")
        if backend is not None
        else check_label(_dig(summary, "backend") or "unknown", f"{s}: field 'backend'")
    )
    return {
        "run_id": run_id,
        "backend": backend,
        "mode": check_label(mode, f"{sweep_path}: field 'mode'"),
    }


def _measured(summary: dict, s: str) -> dict[str, float]:
    """Rank 0's measured state bytes and the job's energy (NaN where the summary has none:
    older runs, or no readable energy counter)."""
    keys = MEMORY_KEYS | ENERGY_KEYS
    return {col: _num(_dig(summary, key), f"{s}: {key}") for col, key in keys.items()}


def load_run(
    run_dir: str | Path, target_accuracy: float | None = None, count_params: bool = False
) -> dict[str, Any]:
    """One completed run as a dict of the :data:`COLUMNS`.

    Every file-format field name of the trainer and the workflow is in this
    function and its helpers above (and nowhere else), so a format change is a
    change here only. Files read: summary.json (required; trainer), run_info.json,
    config.yaml, metrics.jsonl (trainer), sweep.json (workflow; optional for runs
    made by hand). Per-step times come from the epoch records that also give the
    throughput (the first epoch is left out when there are several, as the
    trainer does). ``target_accuracy`` (0..1) gives time-to-target from the
    per-epoch validation accuracy. The gradient size comes from the summary
    (``grad_bytes``, else 4 x ``num_params``; the trainer writes both); only for
    runs whose summary predates them does ``count_params`` rebuild the model from
    config.yaml. tp: sweep.json's, else the summary's (the fsdp/tp backends write
    it), else the run config's ``dist.tp``, else 1. pp, m, schedule and bubble:
    :func:`_run_pipeline`. A summary with ``samples_per_s:
    null`` (the warm-up took every step) gives a row flagged :data:`NO_TIMED_STEPS`,
    not an error: one such point must not cost a study its analysis.
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    f = _run_files(run_dir)
    summary, sweep, config = f["summary"], f["sweep"], f["config"]
    s = str(rd.summary_path)
    ranks = _num(_dig(summary, "world_size"), f"{s}: world_size")
    if not ranks > 0:
        raise UsageError(f"{s}: field 'world_size' missing or not positive")
    samples_per_s = _throughput(summary, s)
    global_batch = _num(_dig(summary, "global_batch_size"), f"{s}: global_batch_size")
    mode = _dig(sweep, "mode") or (
        "weak" if _dig(config, "optim.per_rank_batch_size") is not None else "strong"
    )
    ep = _epoch_columns(
        f["records"],
        _num(_dig(summary, "steps_per_epoch"), f"{s}: steps_per_epoch"),
        target_accuracy,
    )
    final_acc = _dig(summary, "val_acc")
    row = {
        "source": "runs",
        **_labels(run_dir, summary, sweep, mode),
        **_placement(rd, f, ranks),
        "global_batch": global_batch,
        "samples_per_s": samples_per_s,
        "throughput": samples_per_s,
        "throughput_unit": "samples/s",
        "epoch_time_s": ep["epoch_time_s"],
        "step_time_s": global_batch / samples_per_s,
        "data_s": ep["data_s"],
        "compute_s": ep["compute_s"],
        "comm_s": ep["comm_s"],
        "final_accuracy": _num(
            final_acc if final_acc is not None else ep["last_val_acc"], f"{s}: val_acc"
        ),
        **_test_scores(run_dir),
        "time_to_target_s": ep["time_to_target_s"],
        "grad_bytes": _grad_bytes(summary, config, s, count_params),
        "tp": _num(
            _dig(sweep, "tp") or _dig(summary, "tp") or _dig(config, "dist.tp") or 1, f"{s}: tp"
        ),
        **_run_pipeline(summary, config, sweep, s),
        **_measured(summary, s),
        "provenance": check_label(_provenance(summary, run_dir), f"{s}: field 'provenance.id'"),
        "flags": "",
    }
    row["workers"] = row["gpus"] if row["gpus"] > 0 else row["ranks"]
    if _dig(summary, "world_size_changed"):
        return _untimed(row, WORLD_SIZE_CHANGED)
    return _untimed(row) if math.isnan(samples_per_s) else row


def _placement(rd: RunDir, f: dict[str, Any], ranks: float) -> dict[str, float]:
    """Where the run ran: nodes (the sweep's, else its distinct hosts), ranks, GPUs,
    cores per rank and the repeat index."""
    summary, info, sweep, config = f["summary"], f["info"], f["sweep"], f["config"]
    hosts = _dig(info, "hostnames") or next(
        (r["hostnames"] for r in f["records"] if r.get("kind") == "start" and r.get("hostnames")),
        [],
    )
    nodes = _dig(sweep, "nodes") or (len(set(hosts)) if hosts else 1)
    return {
        "nodes": _num(nodes, f"{rd.summary_path}: nodes"),
        "ranks": ranks,
        "gpus": _gpus(summary, sweep, ranks, rd.sweep_path),
        "cores_per_rank": _num(
            _dig(info, "threads_per_rank") or _dig(config, "train.threads") or 1,
            f"{rd.run_info_path}: threads_per_rank",
        ),
        "repeat": _num(_dig(sweep, "repeat") or 0, f"{rd.sweep_path}: repeat"),
    }


def _count(value: Any, where: str) -> int:
    """A whole count >= 1 from a file (a float such as 2.0 from a CSV cell is one)."""
    x = _num(value, where)
    if not (x >= 1 and float(x).is_integer()):
        raise UsageError(f"{where}: expected a whole number >= 1, got {value!r}")
    return int(x)


def pipeline_columns(
    pp: Any, microbatches: Any, virtual_stages: Any, schedule: Any, where: str
) -> dict[str, Any]:
    """pp, microbatches, schedule and bubble of one row. Without a pipeline (pp = 1): one
    micro-batch, schedule :data:`NO_SCHEDULE`, no bubble. m absent: the run config's default
    (:attr:`DistConfig.m`); the bubble is :func:`bubble_fraction`'s."""
    stages = _count(pp if pp is not None else 1, f"{where}: pp")
    if stages == 1:
        return {"pp": 1.0, "microbatches": 1.0, "schedule": NO_SCHEDULE, "bubble": 0.0}
    m = DistConfig.model_construct(
        pp=stages,
        microbatches=None
        if microbatches is None
        else _count(microbatches, f"{where}: microbatches"),
    ).m
    v = _count(virtual_stages if virtual_stages is not None else 1, f"{where}: virtual_stages")
    name = schedule if schedule is not None else DistConfig.model_fields["schedule"].default
    return {
        "pp": float(stages),
        "microbatches": float(m),
        "schedule": check_label(str(name), f"{where}: field 'schedule'"),
        "bubble": bubble_fraction(stages, v, m),
    }


def _run_pipeline(summary: dict, config: dict, sweep: dict, s: str) -> dict[str, Any]:
    """A run's pipeline: the trainer's summary, else its resolved run config, else its
    sweep point; the summary's bubble where it wrote one."""

    def first(key: str) -> Any:
        return _dig(summary, key) or _dig(config, f"dist.{key}") or _dig(sweep, key)

    cols = pipeline_columns(
        first("pp"), first("microbatches"), first("virtual_stages"), first("schedule"), s
    )
    if cols["pp"] > 1 and _dig(summary, "bubble") is not None:
        cols["bubble"] = _num(_dig(summary, "bubble"), f"{s}: bubble")
    recompute = _dig(summary, "activation_checkpointing")
    if recompute is None and cols["pp"] > 1:  # the pipeline's blocks read the run config's
        recompute = _dig(config, "dist.activation_checkpointing")
    cols["recompute"] = bool(recompute)
    return cols


def _throughput(summary: dict, s: str) -> float:
    """summary.json's samples/s; NaN where the trainer wrote null (no step after the
    warm-up); a missing field or a figure <= 0 is a broken file."""
    if "samples_per_s" in summary and summary["samples_per_s"] is None:
        return NAN
    samples_per_s = _num(_dig(summary, "samples_per_s"), f"{s}: samples_per_s")
    if not samples_per_s > 0:
        raise UsageError(f"{s}: field 'samples_per_s' missing or not positive")
    return samples_per_s


#: Columns timed by the trainer: of a run without timed steps they would be warm-up figures.
TIMED = (
    "samples_per_s",
    "throughput",
    "epoch_time_s",
    "step_time_s",
    "data_s",
    "compute_s",
    "comm_s",
)


def _untimed(row: dict[str, Any], flag: str = NO_TIMED_STEPS) -> dict[str, Any]:
    """A run without timed steps of one configuration: flagged, its timings NaN (a warm-up
    step's time is compile and allocation, a mixed world size's is two configurations,
    not the configuration's speed), the rest kept."""
    return {**row, **dict.fromkeys(TIMED, NAN), "flags": flag}


def _test_scores(run_dir: Path) -> dict[str, float]:
    """Accuracy and (language models) perplexity from `scalelab evaluate`'s
    evaluation.json beside the run, when it ran."""
    rd = RunDir(run_dir)
    path, doc = rd.evaluation_path, rd.evaluation()
    if doc is None:
        return {"test_accuracy": NAN, "test_perplexity": NAN}
    return {
        "test_accuracy": _num(doc.get("accuracy"), f"{path}: accuracy"),
        "test_perplexity": _num(doc.get("perplexity"), f"{path}: perplexity"),
    }


def find_run_dirs(path: str | Path) -> list[Path]:
    """Run directories at or below ``path``.

    A run directory is one holding any of summary.json, sweep.json, config.yaml
    or metrics.jsonl; one without summary.json is kept so :func:`load_run`
    reports it (an incomplete run must not vanish silently from a study).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise UsageError(
            f"{path}: not a directory (give run directories or their parent; "
            "tables go to --from-csv)"
        )
    markers = (RunDir.SUMMARY, RunDir.SWEEP, RunDir.CONFIG, RunDir.RUN_CONFIG, RunDir.METRICS)
    if any((path / m).is_file() for m in markers):
        return [path]
    found = sorted(
        {
            p.parent
            for m in markers
            for p in path.rglob(m)
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
        }
    )
    # A nested marker file (e.g. checkpoints/config.yaml) belongs to the outer run.
    return [d for d in found if not any(o != d and o in d.parents for o in found)]


def load_runs(paths: Iterable[str | Path], target_accuracy: float | None = None) -> list[dict]:
    """All runs found at or below ``paths``; an input without any run is an error."""
    rows = []
    for path in paths:
        dirs = find_run_dirs(path)
        if not dirs:
            raise UsageError(
                f"{path}: no run directories (no {RunDir.SUMMARY}/{RunDir.SWEEP} below it)"
            )
        rows.extend(load_run(d, target_accuracy) for d in dirs)
    return rows


def to_frame(rows: list[dict[str, Any]]):
    """The tidy pandas table, columns in :data:`COLUMNS` order."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in NUMERIC:
        frame[col] = pd.to_numeric(frame[col], errors="raise").astype(float)
    return frame
