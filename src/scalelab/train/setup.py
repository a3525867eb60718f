"""Everything built before the first step: data, device, model, optimizer, the run directory.

:func:`build_job` returns a :class:`Job`, the fixed facts of one training run
that the loop reads (it never changes them). The order of the steps is part
of the result: the model is built right after seeding with ``cfg.seed`` so
every rank starts from the same weights, and only then does the backend shard
or wrap it.
"""

from __future__ import annotations

import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalelab.backends import Backend
from scalelab.data.registry import data_source
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.layout import Layout
from scalelab.provenance import record_start
from scalelab.rundir import RunDir
from scalelab.train import checkpoint as ckpt
from scalelab.train.batch import BatchPlan
from scalelab.train.config import RunConfig
from scalelab.train.records import MetricsWriter
from scalelab.train.timing import PhaseTimer, epoch_steps


@dataclass
class Job:
    """One rank's fixed view of the run: config, parallelism, data, model and its optimizer."""

    cfg: RunConfig
    layout: Layout
    plan: BatchPlan
    backend: Backend
    device: torch.device
    threads: int | None
    out: Path
    #: Continue from the newest checkpoint; ``reshard``: even one of another layout.
    resume: bool
    reshard: bool
    train_set: Any
    val_set: Any
    steps_per_epoch: int
    #: The model as built (sharded in place by fsdp/tp); ``model`` is what the step calls
    #: (wrapped by DDP, compiled).
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.Tensor]
    timer: PhaseTimer
    autocast: Any
    use_bf16: bool
    channels_last: bool
    prefetch: bool
    hostnames: list[str]
    metrics: MetricsWriter

    @property
    def main(self) -> bool:
        return self.layout.is_main

    @property
    def run_dir(self) -> RunDir:
        """RUN_DIR = ``out``: its files, preparation and records."""
        return RunDir(self.out)

    @property
    def spec(self) -> DataSpec:
        """What the model was built for: the training split's outputs and input shape."""
        return DataSpec.of(self.train_set)


def steps_per_epoch(cfg: RunConfig, plan: BatchPlan, train_set: Any) -> int:
    """Optimizer steps per epoch: whole global batches of the split, capped by the config."""
    if len(train_set) // plan.global_batch == 0:
        raise UsageError(
            f"field 'optim.global_batch_size': {plan.global_batch} is larger than "
            f"the training split ({len(train_set)} samples)"
        )
    return epoch_steps(len(train_set), plan.global_batch, cfg.train.steps_per_epoch)


def build_job(
    cfg: RunConfig,
    layout: Layout,
    plan: BatchPlan,
    backend: Backend,
    raw_model: torch.nn.Module,
    data: tuple[Any, Any, int],
    device: torch.device,
    threads: int | None,
    out: Path,
    resume: bool,
    *,
    reshard: bool = False,
) -> Job:
    """Apply the backend to the model, make optimizer and schedule, describe the run dir."""
    train_set, val_set, steps = data
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    channels_last = cfg.train.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    prefetch = cfg.data.prefetch if cfg.data.prefetch is not None else device.type == "cuda"

    raw_model = backend.prepare(raw_model, cfg.model.sync_batchnorm)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, raw_model, plan.lr)
    model, optimizer = backend.wrap(raw_model, optimizer, plan.accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps))
    if cfg.train.compile:
        model = torch.compile(model)
    timer = PhaseTimer(device)  # CUDA events on GPUs, the host clock on the CPU
    timer.attach(optimizer)
    hostnames = backend.gather_object(socket.gethostname())
    return Job(
        cfg=cfg,
        layout=layout,
        plan=plan,
        backend=backend,
        device=device,
        threads=threads,
        out=out,
        resume=resume,
        reshard=reshard,
        train_set=train_set,
        val_set=val_set,
        steps_per_epoch=steps,
        raw_model=raw_model,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for p in raw_model.parameters() if p.requires_grad],
        timer=timer,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
        use_bf16=use_bf16,
        channels_last=channels_last,
        prefetch=prefetch,
        hostnames=hostnames,
        metrics=MetricsWriter(RunDir(out).metrics_path, enabled=layout.is_main),
    )


def describe_run_dir(job: Job, info: dict[str, Any]) -> None:
    """Rank 0 marks RUN_DIR as a run and writes what it is (config, provenance, run_info)."""
    if not job.main:
        return
    # A run directory (what scalelab may resume or replace); a fresh run drops an earlier
    # attempt's metrics and weights.
    run_dir = job.run_dir
    run_dir.prepare(job.resume)

    record_start(job.cfg, job.out, job.layout, resume=job.resume)  # every input check has passed
    run_dir.write_config(job.cfg.to_dict())
    run_dir.write_run_info(info)


def check_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Refuse to overwrite a run; return the summary of a completed one on --resume."""
    return RunDir(out).check_start(resume, ckpt.list_checkpoints)


def open_datasets(cfg: RunConfig):
    """The training and validation splits (validation None when not configured)."""
    return data_source(cfg.data.source).open(cfg)


def pick_device(want: str, layout: Layout) -> torch.device:
    """The local rank's GPU, or the CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("field 'train.device': 'cuda' requested but no GPU is visible")
    return torch.device("cuda", layout.local_rank % torch.cuda.device_count())


def configure_torch(cfg: RunConfig, layout: Layout, device: torch.device) -> int | None:
    """Threads per rank on the CPU (cores / ranks on the node unless set); determinism."""
    threads = None
    if device.type == "cpu":
        threads = cfg.train.threads
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        if threads is None:
            cores = (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1)
            )
            threads = max(1, cores // layout.local_world_size)
        torch.set_num_threads(threads)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )


def lr_factor(cfg: RunConfig, steps_per_epoch: int):
    """Multiplier of the effective lr after ``step`` optimizer steps (warm-up, then decay)."""
    o = cfg.optim
    warmup = round(o.warmup_epochs * steps_per_epoch)
    total = cfg.train.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if o.schedule == "step":
            return o.gamma ** sum(step / steps_per_epoch >= m for m in o.milestones)
        return 1.0

    return factor
