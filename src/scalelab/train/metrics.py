"""Training metrics: JSON lines, a fixed-format epoch line, the final summary.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line with a ``kind``:
``start`` (each process start, resumes included), ``step`` (every
``metrics.log_every`` steps), ``epoch``, ``preempted`` and ``end``. Each line is
written with one ``write`` on an ``O_APPEND`` descriptor, so a crash can cut
the file only between lines. ``RUN_DIR/summary.json`` is written atomically
and last: its presence means the run completed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def throughput(history: list[dict[str, Any]]) -> float | None:
    """Run samples/s: the first epoch excluded when there are several (warm-up)."""
    epochs = history[1:] if len(history) > 1 else history
    samples = sum(e["timed_samples"] for e in epochs)
    seconds = sum(e["timed_s"] for e in epochs)
    return samples / seconds if seconds > 0 else None


class PhaseTimer:
    """Seconds of data, compute and exposed communication per step.

    On the CPU the host clock is the truth: data is the wait for the batch, comm
    what the backend reports for its allreduce, compute the rest of the step.

    On a GPU the host only enqueues work, so host timestamps put backward compute
    still running on the device into whatever the host waits on next (Horovod's
    ``synchronize``: the comm time). There CUDA events are recorded on the current
    stream at the phase boundaries: step start, batch ready, backward enqueued,
    gradients reduced (an optimizer step pre-hook: after the allreduce wait, before
    the update) and step end. They are read at interval boundaries only (one
    ``synchronize`` per log interval, where the loop syncs anyway), so timing adds no
    stall. An event completes when the stream reaches it *and* the host has
    recorded it, so backward -> reduced is the communication the device really
    waited for, and a device starved for data shows it as data time.
    """

    MARKS = ("start", "ready", "backward", "reduced", "end")

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self._steps: list[tuple[dict[str, Any], float, float, float | None]] = []
        self._current: dict[str, Any] = {}

    def attach(self, optimizer: Any) -> None:
        """Mark 'reduced' at the start of every optimizer step (GPU only)."""
        if self.cuda:
            optimizer.register_step_pre_hook(lambda *_: self.mark("reduced"))

    def mark(self, name: str) -> None:
        """Record boundary ``name`` (one of :data:`MARKS`); a no-op on the CPU."""
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self._current[name] = event

    def end(self, step_s: float, data_s: float, comm_s: float | None) -> None:
        """Close the step with the host's times (used as they are on the CPU)."""
        self.mark("end")
        self._steps.append((self._current, step_s, data_s, comm_s))
        self._current = {}

    def collect(self) -> tuple[float, float, float]:
        """(data, compute, comm) seconds summed over the steps since the last call."""
        steps, self._steps = self._steps, []
        data = compute = comm = 0.0
        if self.cuda and steps:
            steps[-1][0]["end"].synchronize()
        for marks, step_s, host_data, host_comm in steps:
            if self.cuda:
                def gap(a: str, b: str, m: dict[str, Any] = marks) -> float:
                    return m[a].elapsed_time(m[b]) / 1e3
                reduced = "reduced" if "reduced" in marks else "end"
                d = gap("start", "ready")
                m = gap("backward", reduced) if host_comm is not None else 0.0
                c = gap("ready", "end") - m
            else:
                d, m = host_data, host_comm or 0.0
                c = max(0.0, step_s - d - m)
            data, compute, comm = data + d, compute + c, comm + m
        return data, compute, comm


#: Published dense (no sparsity) BF16 tensor-core peaks in FLOP/s per GPU, matched
#: against torch.cuda.get_device_name (first match wins: specific names first).
#: Sources (NVIDIA datasheets, which print the sparse figure; dense is half):
#: H100 SXM5 / H200 1,979 sparse -> 989 dense; H100 PCIe 1,513 -> 756; A100 624 -> 312
#: (nanoGPT's estimate_mfu uses the same 312e12); L40S 733 -> 362; L4 242 -> 121.
#: docs/benchmarks.md carries the table with its sources.
PEAK_BF16_DENSE: tuple[tuple[str, float, str], ...] = (
    ("H200", 989e12, "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity"),
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet (PCIe): BF16 1,513 TFLOPS with sparsity"),
    ("H100", 989e12, "NVIDIA H100 datasheet (SXM5): BF16 1,979 TFLOPS with sparsity"),
    ("A100", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("L40S", 362e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity"),
    ("L4", 121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
)


def peak_bf16(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of a GPU by name, None when not in the table."""
    for key, flops, source in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return flops, source
    return None


def forward_flops(name: str, options: dict[str, Any], num_classes: int,
                  image_shape: tuple[int, ...]) -> float | None:
    """Forward FLOPs of one sample (2 per multiply-add), counted by torch's
    FlopCounterMode on a copy of the model on the meta device (no memory, no
    compute); None where counting fails (an op the counter does not know)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scalelab.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(name, num_classes, tuple(image_shape), **options)
            x = torch.empty(1, *image_shape)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops()) or None
    except Exception:  # noqa: BLE001 - an unknown op only means "not known"
        return None


def model_facts(name: str, options: dict[str, Any], num_classes: int,
                image_shape: tuple[int, ...], model: Any, device: Any,
                samples_per_s_per_rank: float | None, bf16: bool) -> dict[str, Any]:
    """Parameter count, gradient bytes, FLOPs per sample and (on GPUs) MFU.

    Training FLOPs per sample = 3 x forward (backward costs two forwards, the
    convention of nanoGPT's estimate_mfu and the PaLM paper's MFU). MFU = achieved
    training FLOP/s per GPU / the card's published dense bf16 peak: on the CPU, on an
    unknown card or without a FLOP count it is None, and ``mfu_peak`` says why.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    fwd = forward_flops(name, options, num_classes, image_shape)
    facts: dict[str, Any] = {
        "num_params": num_params,
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "flops_per_sample_forward": fwd,
        "flops_per_sample_train": 3 * fwd if fwd else None,
        "mfu": None,
        "mfu_peak": None,
    }
    if getattr(device, "type", "cpu") != "cuda":
        facts["mfu_peak"] = "none: CPU run (MFU is reported on GPUs only)"
        return facts
    import torch

    card = torch.cuda.get_device_name(device)
    peak = peak_bf16(card)
    if peak is None:
        facts["mfu_peak"] = f"none: {card!r} is not in scalelab's peak table"
    elif fwd and samples_per_s_per_rank:
        facts["mfu"] = 3 * fwd * samples_per_s_per_rank / peak[0]
        facts["mfu_peak"] = (f"{card}: {peak[0] / 1e12:g} TFLOP/s dense bf16 ({peak[1]})"
                             + ("" if bf16 else "; this run was not bf16"))
    return facts


def epoch_record(stats: EpochStats, epoch: int, epochs: int, global_step: int,
                 val_loss: float | None, val_acc: float | None) -> dict[str, Any]:
    """The metrics.jsonl record of a finished epoch (also the run history's entry)."""
    return {
        "kind": "epoch", "epoch": epoch, "epochs": epochs, "global_step": global_step,
        "train_loss": stats.loss_sum / stats.count if stats.count else None,
        "train_acc": stats.correct / stats.count if stats.count else None,
        "val_loss": val_loss, "val_acc": val_acc,
        "samples_per_s": stats.timed_samples / stats.timed_s if stats.timed_s else None,
        "timed_samples": stats.timed_samples, "timed_s": stats.timed_s,
        "time_s": stats.wall_s, "data_s": stats.data_s, "compute_s": stats.compute_s,
        "comm_s": stats.comm_s if stats.comm_measured else None,
    }
