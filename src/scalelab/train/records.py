"""What a run writes about itself: metrics.jsonl records, run_info.json, summary.json.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line with a ``kind``:
``start`` (each process start, resumes included), ``resume``, ``membership`` (the
world size changed since the previous start: an elastic restart or a resharded resume),
``step`` (every ``metrics.log_every`` steps), ``epoch``, ``preempted`` and ``end``. Each line is
written with one ``write`` on an ``O_APPEND`` descriptor, so a crash can cut
the file only between lines.

``run_info.json`` is written at the start. ``summary.json`` is written atomically
and last: its presence marks a completed run; its figures come from the epoch
history (throughput excludes warm-up) plus facts measured on the model and
the backend (parameters, FLOPs, per-rank memory, MFU on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scalelab.backends import ParallelDims, library_versions
from scalelab.backends.pipeline_rules import SCHEDULES, bubble_fraction
from scalelab.container import inside_image_info
from scalelab.data.spec import FIELD as DATA_SPEC
from scalelab.data.spec import DataSpec
from scalelab.models.flops import forward_flops, mfu, train_flops
from scalelab.models.gpt import lm_facts
from scalelab.redact import redact_argv
from scalelab.rundir import RunDir
from scalelab.train.peak import peak_bf16
from scalelab.train.timing import throughput

if TYPE_CHECKING:
    from scalelab.train.setup import Job
    from scalelab.train.state import TrainState

# ----------------------------------------------------------------------------- metrics.jsonl

#: Matches the human epoch line; groups: epoch, epochs, train_loss, train_acc,
#: val_loss, val_acc, samples_per_s, time_s (val_* may be "nan").
EPOCH_LINE_RE = re.compile(
    r"^epoch (?P<epoch>\d+)/(?P<epochs>\d+) "
    r"train_loss (?P<train_loss>\S+) train_acc (?P<train_acc>\S+) "
    r"val_loss (?P<val_loss>\S+) val_acc (?P<val_acc>\S+) "
    r"samples_per_s (?P<samples_per_s>\S+) time_s (?P<time_s>\S+)$"
)


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def format_epoch_line(rec: dict[str, Any]) -> str:
    """The one-line epoch report (see :data:`EPOCH_LINE_RE`)."""
    return (
        f"epoch {rec['epoch'] + 1}/{rec['epochs']} "
        f"train_loss {_num(rec['train_loss'], 4)} train_acc {_num(rec['train_acc'], 4)} "
        f"val_loss {_num(rec.get('val_loss'), 4)} val_acc {_num(rec.get('val_acc'), 4)} "
        f"samples_per_s {_num(rec.get('samples_per_s'), 1)} time_s {_num(rec['time_s'], 2)}"
    )


@dataclass
class EpochStats:
    """Sums over one epoch so far (global over ranks); carried in checkpoints."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    #: Post-warm-up steps: global samples and their wall time (rank 0's clock).
    timed_samples: float = 0.0
    timed_s: float = 0.0
    data_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    comm_measured: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl``; a no-op on ranks other than 0.

    The file is opened at the first record, so a writer can exist before the run
    directory is set up (and its stale files removed)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._fd: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line, one write call)."""
        if self._fd is None:
            if not self.enabled:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        record = {"time": round(time.time(), 3), **record}
        os.write(self._fd, (json.dumps(record, allow_nan=True) + "\n").encode())

    def sync(self) -> None:
        """fsync the file (at epoch ends, not per step)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self.enabled = False  # a record after close() is a bug, not a reason to reopen


def epoch_record(
    stats: EpochStats,
    epoch: int,
    epochs: int,
    global_step: int,
    val_loss: float | None,
    val_acc: float | None,
) -> dict[str, Any]:
    """The metrics.jsonl record of a finished epoch (also the run history's entry)."""
    return {
        "kind": "epoch",
        "epoch": epoch,
        "epochs": epochs,
        "global_step": global_step,
        "train_loss": stats.loss_sum / stats.count if stats.count else None,
        "train_acc": stats.correct / stats.count if stats.count else None,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "samples_per_s": stats.timed_samples / stats.timed_s if stats.timed_s else None,
        "timed_samples": stats.timed_samples,
        "timed_s": stats.timed_s,
        "time_s": stats.wall_s,
        "data_s": stats.data_s,
        "compute_s": stats.compute_s,
        "comm_s": stats.comm_s if stats.comm_measured else None,
    }


# ----------------------------------------------------------------------------- run_info, summary


def run_info(job: Job) -> dict[str, Any]:
    """How this run was started: layout, hosts, device, plan, precision, versions, image."""

    device, cfg = job.device, job.cfg
    return {
        "layout": asdict(job.layout),
        "hostnames": job.hostnames,
        "backend": job.backend.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads_per_rank": job.threads,
        "plan": asdict(job.plan),
        DATA_SPEC: job.spec.to_dict(),  # what predict and evaluate build the model for
        "steps_per_epoch": job.steps_per_epoch,
        "precision": "bf16" if job.use_bf16 else "fp32",
        "channels_last": job.channels_last,
        "compile": cfg.train.compile,
        "deterministic": cfg.train.deterministic,
        "resume": job.resume,
        "argv": redact_argv(list(sys.argv)),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **library_versions(),
            "numpy": np.__version__,
        },
        "container": inside_image_info(),  # None on the host; proof of the image otherwise
    }


def summary(job: Job, state: TrainState, reasons: dict[str, str]) -> dict[str, Any]:
    """summary.json: the run's figures (every rank computes it; rank 0 writes it)."""
    cfg, plan, history = job.cfg, job.plan, state.history
    last = history[-1] if history else {}
    rate = throughput(history)
    comm = [e["comm_s"] for e in history if e["comm_s"] is not None]
    world = job.layout.world_size
    out = {
        "status": "completed",
        "epochs": cfg.train.epochs,
        "global_steps": state.global_step,
        "steps_per_epoch": job.steps_per_epoch,
        "world_size": world,
        "backend": job.backend.name,
        "launcher": job.layout.launcher,
        "device": str(job.device),
        "global_batch_size": plan.global_batch,
        "per_rank_batch_size": plan.per_rank_batch,
        "grad_accum_steps": plan.accum_steps,
        "lr": plan.lr,
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "val_loss": last.get("val_loss"),
        "val_acc": last.get("val_acc"),
        "samples_per_s": rate,
        "samples_per_s_per_rank": rate / world if rate else None,
        "throughput_excludes": "first epoch"
        if len(history) > 1
        else f"first {cfg.metrics.warmup_steps} steps",
        "time_s": sum(e["time_s"] for e in history),
        "time_split_s": {
            "data": sum(e["data_s"] for e in history),
            "compute": sum(e["compute_s"] for e in history),
            "comm": sum(comm) if comm else None,
        },
        "resumes": state.resumes,
        # an elastic run that lost or gained nodes: its throughput mixes world sizes, so
        # it is no clean scaling point (analysis leaves it out of the figures)
        "world_sizes": state.world_sizes,
        "world_size_changed": len(set(state.world_sizes)) > 1,
        "membership": list(state.membership),
        "model_file": RunDir.MODEL,
    }
    out.update(
        model_facts(
            cfg.model.name,
            cfg.model.options,
            job.spec,
            job.raw_model,
            job.device,
            out["samples_per_s_per_rank"],
            job.use_bf16,
        )
    )
    out.update(job.backend.memory_facts())
    d = cfg.dist
    out.update(
        pipeline_facts(
            job.backend.dims, d.activation_checkpointing or d.fsdp.activation_checkpointing
        )
    )
    out.update(lm_facts(job.raw_model, out, job.device, peak_bf16))
    out.update(energy_facts(history, reasons))
    return out


def model_facts(
    name: str,
    options: dict[str, Any],
    spec: DataSpec,
    model: Any,
    device: Any,
    samples_per_s_per_rank: float | None,
    bf16: bool,
) -> dict[str, Any]:
    """Parameter count, gradient bytes, FLOPs per sample and (on GPUs) MFU.

    FLOPs and MFU come from :mod:`scalelab.models.flops` (training = 3 x forward; MFU =
    achieved training FLOP/s per GPU / the card's published dense bf16 peak): on the CPU,
    on an unknown card or without a FLOP count MFU is None, and ``mfu_peak`` says why.
    """
    num_params, grad_bytes = whole_counts(model)
    fwd = forward_flops(name, options, spec)
    facts: dict[str, Any] = {
        "num_params": num_params,
        "grad_bytes": grad_bytes,
        "flops_per_sample_forward": fwd,
        "flops_per_sample_train": train_flops(fwd),
        "mfu": None,
        "mfu_peak": None,
    }
    if getattr(device, "type", "cpu") != "cuda":
        facts["mfu_peak"] = "none: CPU run (MFU is reported on GPUs only)"
        return facts
    card = torch.cuda.get_device_name(device)
    peak = peak_bf16(card)
    if peak is None:
        facts["mfu_peak"] = f"none: {card!r} is not in scalelab's peak table"
    elif fwd and samples_per_s_per_rank:
        facts["mfu"] = mfu(train_flops(fwd), samples_per_s_per_rank, peak[0])
        facts["mfu_peak"] = f"{card}: {peak[0] / 1e12:g} TFLOP/s dense bf16 ({peak[1]})" + (
            "" if bf16 else "; this run was not bf16"
        )
    return facts


def pipeline_facts(dims: ParallelDims, recompute: bool) -> dict[str, Any]:
    """The layout a run had, whether blocks recomputed their activations, and its
    pipeline's bubble (pp - 1) / (v m)."""
    facts: dict[str, Any] = {
        "dp": dims.dp,
        "tp": dims.tp,
        "pp": dims.pp,
        "activation_checkpointing": recompute,
    }
    if dims.pp > 1:
        pipe = dims.pipe
        facts.update(
            microbatches=pipe.m,
            schedule=pipe.schedule,
            virtual_stages=pipe.v,
            bubble=bubble_fraction(dims.pp, pipe.v, pipe.m),
            bubble_is_upper_bound=SCHEDULES[pipe.schedule].zero_bubble,
        )
    return facts


def whole_counts(model: Any) -> tuple[int, int]:
    """Trainable parameters of the whole model and their gradient bytes: a pipeline rank's
    piece knows the whole model's (``whole_counts``); sharded parameters count whole."""
    known = getattr(model, "whole_counts", None)
    if known is not None:
        return known
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def energy_facts(history: list[dict[str, Any]], reasons: dict[str, str]) -> dict[str, Any]:
    """Joules per trained sample over the epochs the throughput covers (the first is
    warm-up when there are several), from the rank-summed counters of each epoch.

    ``reasons`` (this rank's, why a counter could not be opened) is reported when no
    figure exists, so a missing number explains itself rather than reading as zero.
    """
    epochs = history[1:] if len(history) > 1 else history
    joules = [e.get("energy_j") for e in epochs]
    if not epochs or any(j is None for j in joules):
        return {
            "energy_j": None,
            "joules_per_sample": None,
            "energy_sources": [],
            "energy_unavailable": reasons or {"all": "an epoch has no energy reading"},
        }
    samples = sum(e["energy_samples"] for e in epochs)
    seconds = sum(e["energy_s"] for e in epochs)
    return {
        "energy_j": sum(joules),
        "joules_per_sample": sum(joules) / samples,
        "energy_power_w": sum(joules) / seconds if seconds > 0 else None,
        "energy_sources": sorted({s for e in epochs for s in e["energy_sources"]}),
        "energy_excludes": "first epoch and validation" if len(history) > 1 else "validation",
        "energy_unavailable": reasons,
    }
