"""Where a step's time goes: the phase timer (data, compute, exposed communication) and
the run's throughput from its epoch history (warm-up excluded)."""

from __future__ import annotations

import time
from typing import Any


def epoch_steps(samples: int, global_batch: int, cap: int | None) -> int:
    """Optimizer steps per epoch: whole global batches of the training split's ``samples``
    (the last partial batch is dropped), capped by ``train.steps_per_epoch``. The trainer
    (:func:`scalelab.train.setup.steps_per_epoch`) and the plan use this one rule."""
    steps = samples // global_batch
    return min(steps, cap) if cap else steps


def timed_steps(steps_per_epoch: int, epochs: int, warmup_steps: int) -> int:
    """Steps that reach the run's samples/s: the trainer times a step once the process has
    done more than ``metrics.warmup_steps`` steps (:meth:`Trainer.after_step`), and
    :func:`throughput` leaves out the first epoch when there are several."""
    if epochs <= 1:
        return max(0, steps_per_epoch - warmup_steps)
    spill = max(0, warmup_steps - steps_per_epoch)  # warm-up left after the first epoch
    return max(0, (epochs - 1) * steps_per_epoch - spill)


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


class StepClock:
    """Step times and the epoch's wall time on this rank's host clock."""

    def __init__(self) -> None:
        self.epoch_start = self.last = time.perf_counter()

    def step(self) -> float:
        """Seconds since the previous step ended."""
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    def epoch(self) -> float:
        """Seconds since the epoch (or its last checkpoint) began; restarts the count."""
        now = time.perf_counter()
        elapsed, self.epoch_start = now - self.epoch_start, now
        return elapsed

    def skip(self) -> None:
        """Do not count the time since the last step as step time (a checkpoint write)."""
        self.last = time.perf_counter()
