"""Step metrics summed over ranks without a blocking collective per step.

Each step adds its loss, correct predictions and target count to a small
float64 tensor on the device. At a sync point (every ``metrics.log_every``
steps, the end of an epoch, before a checkpoint) the loop starts one
asynchronous all-reduce of that tensor together with this rank's stop flag;
the reduction runs while the next step computes, and its result is booked at
the following sync point, the same step on every rank. So all ranks agree on
when to stop, and metrics cost one small collective per interval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from scalelab.backends import Backend
from scalelab.train.records import EpochStats, MetricsWriter


class MetricsReducer:
    """Owns the in-flight reductions of one rank: what was summed, what is on the wire."""

    def __init__(
        self, backend: Backend, device: torch.device, metrics: MetricsWriter, global_batch: int
    ) -> None:
        self.backend, self.device, self.metrics = backend, device, metrics
        self.global_batch = global_batch
        self.inflight: list[tuple[Callable[[], list[float]], dict[str, Any]]] = []
        self._reset()

    def _reset(self) -> None:
        self.pending = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, hits, n
        self.interval = {"steps": 0, "time": 0.0, "data": 0.0, "comm": 0.0}

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one micro-batch (targets: a sample's label, or the tokens of a sequence)."""
        n = torch.tensor(float(targets.numel()), device=self.device, dtype=torch.float64)
        self.pending += torch.stack(
            [
                loss.detach().double() * targets.numel(),
                (logits.argmax(1) == targets).sum().double(),
                n,
            ]
        )

    def step_done(self, step_s: float) -> None:
        self.interval["steps"] += 1
        self.interval["time"] += step_s

    def start(self, stop: bool, data_s: float, comm_s: float, where: dict[str, Any]) -> None:
        """Start summing this interval's metrics and the stop flag over ranks."""
        self.interval["data"] += data_s
        self.interval["comm"] += comm_s
        flag = torch.tensor([float(stop)], dtype=torch.float64, device=self.device)
        handle = self.backend.allreduce_async(torch.cat([flag, self.pending]))
        self.inflight.append((handle, {**where, **self.interval}))
        self._reset()

    def finish(self, stats: EpochStats, bar: Any, keep: int = 0) -> bool:
        """Book finished reductions until at most ``keep`` are in flight; return whether any
        rank asked to stop in them."""
        stop = False
        while len(self.inflight) > keep:
            stop |= self._book(*self.inflight.pop(0), stats, bar)
        return stop

    def _book(
        self, result: Callable[[], list[float]], info: dict[str, Any], stats: EpochStats, bar: Any
    ) -> bool:
        flag, loss_sum, correct, count = result()
        stats.loss_sum += loss_sum
        stats.correct += correct
        stats.count += count
        n = info["steps"]
        self.metrics.write(
            {
                "kind": "step",
                "epoch": info["epoch"],
                "step": info["step"],
                "global_step": info["global_step"],
                "loss": loss_sum / count,
                "acc": correct / count,
                "lr": info["lr"],
                "step_time": info["time"] / n,
                "samples_per_s": self.global_batch * n / info["time"],
                "data_s": info["data"] / n,
                "comm_s": info["comm"] / n if self.backend.measures_comm else None,
            }
        )
        bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        return flag > 0
