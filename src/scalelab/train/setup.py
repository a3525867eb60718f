"""Everything built before the first step: data, device, model, optimizer, the run directory.

:func:`build_job` returns a :class:`Job`, the fixed facts of one training run
that the loop reads (it never changes them). The order of the steps is part
of the result: the model is built right after seeding with ``cfg.seed`` so
every rank starts from the same weights, and only then does the backend shard
or wrap it.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from scalelab.backends import Backend
from scalelab.data.spec import DataSpec
from scalelab.errors import DataError, UsageError
from scalelab.fsio import atomic_write_json, atomic_write_text, write_marker
from scalelab.layout import Layout
from scalelab.train import checkpoint as ckpt
from scalelab.train.cli import RUN_FILES
from scalelab.train.config import BatchPlan, RunConfig
from scalelab.train.metrics import MetricsWriter, PhaseTimer


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
    def spec(self) -> DataSpec:
        """What the model was built for: the training split's outputs and input shape."""
        return DataSpec.of(self.train_set)


def steps_per_epoch(cfg: RunConfig, plan: BatchPlan, train_set: Any) -> int:
    """Optimizer steps per epoch: whole global batches of the split, capped by the config."""
    steps = len(train_set) // plan.global_batch
    if steps == 0:
        raise UsageError(f"field 'optim.global_batch_size': {plan.global_batch} is larger than "
                         f"the training split ({len(train_set)} samples)")
    return min(steps, cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch else steps


def build_job(cfg: RunConfig, layout: Layout, plan: BatchPlan, backend: Backend,
              raw_model: torch.nn.Module, data: tuple[Any, Any, int], device: torch.device,
              threads: int | None, out: Path, resume: bool, *, reshard: bool = False) -> Job:
    """Apply the backend to the model, make optimizer and schedule, describe the run dir."""
    train_set, val_set, steps = data
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
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
    return Job(cfg=cfg, layout=layout, plan=plan, backend=backend, device=device,
               threads=threads, out=out, resume=resume, reshard=reshard,
               train_set=train_set, val_set=val_set,
               steps_per_epoch=steps, raw_model=raw_model, model=model, optimizer=optimizer,
               scheduler=scheduler, params=[p for p in raw_model.parameters() if p.requires_grad],
               timer=timer,
               autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
               use_bf16=use_bf16, channels_last=channels_last, prefetch=prefetch,
               hostnames=hostnames, metrics=MetricsWriter(out / "metrics.jsonl",
                                                          enabled=layout.is_main))


def describe_run_dir(job: Job, info: dict[str, Any]) -> None:
    """Rank 0 marks RUN_DIR as a run and writes what it is (config, provenance, run_info)."""
    if not job.main:
        return
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "run", RUN_FILES)  # a run directory: what scalelab may resume or replace
    from scalelab.provenance import record_start

    record_start(job.cfg, out, job.layout, resume=job.resume)  # every input check has passed
    if not job.resume:
        for stale in ("metrics.jsonl", "model.pt"):
            (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(job.cfg.to_dict(), sort_keys=False))
    atomic_write_json(out / "run_info.json", info)


def check_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Refuse to overwrite a run; return the summary of a completed one on --resume."""
    summary = out / "summary.json"
    if summary.exists():
        if resume:
            return json.loads(summary.read_text())
        raise UsageError(f"--out {out}: holds a completed run (summary.json); "
                         "choose a new directory")
    if not resume and ckpt.list_checkpoints(out / "checkpoints"):
        raise UsageError(f"--out {out}: holds checkpoints of an unfinished run; pass --resume "
                         "to continue it or choose a new directory")
    return None


def generated_test_split(cfg: RunConfig):
    """The test split of a generated source (None for data on disk): as many samples as
    validation, with ids after training and validation, so neither has seen them."""
    d = cfg.data
    first = d.num_samples + d.val_samples
    if d.source == "tokens":
        from scalelab.data.tokens import TokenSequences

        return TokenSequences(d.val_samples, d.vocab_size, d.seq_len, cfg.seed,
                              first_index=first)
    if d.source == "synthetic":
        from scalelab.data.synthetic import SyntheticDataset

        return SyntheticDataset(d.val_samples, d.num_classes, tuple(d.image_shape), cfg.seed,
                                d.signal, first_index=first)
    return None


def open_datasets(cfg: RunConfig):
    """The training and validation splits (validation None when not configured)."""
    d = cfg.data
    if d.source == "tokens":
        from scalelab.data.tokens import token_splits

        return token_splits(d.num_samples, d.val_samples if d.val_split else None,
                            d.vocab_size, d.seq_len, cfg.seed)
    if d.source == "synthetic":
        from scalelab.data.synthetic import SyntheticDataset

        shape = tuple(d.image_shape)
        train = SyntheticDataset(d.num_samples, d.num_classes, shape, cfg.seed, d.signal)
        val = None
        if d.val_split:
            val = SyntheticDataset(d.val_samples, d.num_classes, shape, cfg.seed, d.signal,
                                   first_index=d.num_samples)
        return train, val
    return _open_files(cfg)


def _open_files(cfg: RunConfig):
    """Staged shards or an in-memory .npz: open both splits and check they agree."""
    d = cfg.data
    if not Path(d.path).exists():
        raise UsageError(f"field 'data.path': no such file or directory: {d.path}")
    path = d.path
    if d.localize and d.source == "staged":
        # Every rank asks; the first on each node copies, the others wait for it.
        from scalelab.data.nodelocal import localize

        try:
            path = str(localize(d.path, d.scratch, progress=False))
        except DataError as exc:  # a corrupt dataset is a failed check (exit 1)
            raise type(exc)(f"field 'data.localize': {exc}") from None
        except OSError as exc:
            raise UsageError(f"field 'data.localize': {exc}") from None
    if d.source == "memory-npz":
        from scalelab.data.memory import load_npz as opener
    else:
        try:
            from scalelab.data.shards import open_split as opener
        except ImportError as exc:
            raise UsageError(f"field 'data.source': 'staged' needs scalelab.data.shards, which "
                             f"does not import here ({exc})") from None
    splits = []
    for field_name, split in (("data.train_split", d.train_split), ("data.val_split", d.val_split)):
        if split is None:
            splits.append(None)
            continue
        try:
            splits.append(opener(path, split))
        except DataError as exc:  # corrupt data stays a failed check (1), bad input 2
            raise type(exc)(f"field '{field_name}': {split!r} in {path}: {exc}") from None
        except (OSError, KeyError, ValueError) as exc:
            raise UsageError(f"field '{field_name}': {split!r} in {path}: {exc}") from None
    train, val = splits
    _check_splits(cfg, train, val)
    return train, val


def _check_splits(cfg: RunConfig, train: Any, val: Any) -> None:
    d = cfg.data
    if len(train) == 0:
        raise UsageError(f"field 'data.train_split': {d.train_split!r} in {d.path} is empty")
    if val is not None and len(val) == 0:
        raise UsageError(f"field 'data.val_split': {d.val_split!r} in {d.path} is empty; "
                         "stage with a validation fraction > 0, or set data.val_split: null")
    if val is not None and (val.image_shape != train.image_shape
                            or val.num_classes != train.num_classes):
        raise UsageError(f"field 'data.val_split': {d.val_split!r} has shape {val.image_shape} "
                         f"and {val.num_classes} classes, unlike the training split")


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
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
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
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


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
