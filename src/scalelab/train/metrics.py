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
    """Appends JSON records to ``metrics.jsonl``; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self._fd: int | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line, one write call)."""
        if self._fd is None:
            return
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


def throughput(history: list[dict[str, Any]]) -> float | None:
    """Run samples/s: the first epoch excluded when there are several (warm-up)."""
    epochs = history[1:] if len(history) > 1 else history
    samples = sum(e["timed_samples"] for e in epochs)
    seconds = sum(e["timed_s"] for e in epochs)
    return samples / seconds if seconds > 0 else None
