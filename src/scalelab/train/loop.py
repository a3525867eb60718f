"""The training loop: one readable function, no callbacks.

``run`` validates everything that can be wrong with the input *before* any
process group exists or any file is written (so bad input fails fast, on
every rank alike, with exit 2), then hands over to ``_train``, which reads
top to bottom: build, resume, loop over epochs and steps, validate, checkpoint,
summarize. Parallelism lives in the backend (``scalelab.backends``); the data
order in ``scalelab.train.sampling``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from scalelab.backends import Backend, choose_backend, make_backend
from scalelab.errors import DataError, UsageError
from scalelab.fsio import atomic_write, atomic_write_json, atomic_write_text, write_marker
from scalelab.layout import Layout, detect
from scalelab.models import build_model
from scalelab.models.gpt import lm_facts
from scalelab.train import checkpoint as ckpt
from scalelab.train.config import (
    BatchPlan,
    Parallelism,
    RunConfig,
    from_dict,
    load,
    resolve_batch,
)
from scalelab.train.metrics import (
    EpochStats,
    MetricsWriter,
    PhaseTimer,
    format_epoch_line,
    model_facts,
    peak_bf16,
    throughput,
)
from scalelab.train.sampling import Batches, epoch_order, eval_shard, rank_batches
from scalelab.train.signals import Preempted, StopRequest
from scalelab.train.watchdog import Watchdog

#: Extra seconds the watchdog grants torch.distributed's own timeout before stepping in.
WATCHDOG_GRACE_S = 60.0


def run(config: RunConfig | dict | str | Path, out_dir: str | Path, *,
        resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train as configured, writing RUN_DIR = ``out_dir``; return the summary dict.

    ``config`` is a RunConfig, a nested dict or a YAML path. Raises UsageError
    for bad input (nothing written), Preempted after a stop signal (checkpoint
    written). Every rank of the job calls this.
    """
    stop = StopRequest().install()  # early: a signal during start-up must not kill us
    try:
        return _run(config, Path(out_dir), resume, overrides or [], stop)
    finally:
        stop.restore()


def _run(config: RunConfig | dict | str | Path, out: Path, resume: bool, overrides: list[str],
         stop: StopRequest) -> dict[str, Any]:
    if isinstance(config, RunConfig):
        cfg = config if not overrides else load_from_config(config, overrides)
    elif isinstance(config, dict):
        cfg = load_from_config(from_dict(config), overrides)
    else:
        cfg = load(config, overrides)
    layout = detect()
    backend_name = choose_backend(cfg.dist.backend, layout, cfg.dist.tp, cfg.model.name)
    plan = resolve_batch(cfg, Parallelism(layout.world_size, cfg.dist.tp))
    done = _check_run_dir(out, resume)
    if done is not None:
        if layout.is_main:
            print(f"scalelab train: {out} already holds a completed run; nothing to do")
        return done
    train_set, val_set = open_datasets(cfg)
    steps_per_epoch = len(train_set) // plan.global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"field 'optim.global_batch_size': {plan.global_batch} is larger than "
                         f"the training split ({len(train_set)} samples)")
    if cfg.train.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    device = pick_device(cfg.train.device, layout)
    threads = _configure_torch(cfg, layout, device)
    _seed_everything(cfg.seed)  # same initial weights on every rank
    raw_model = build_model(cfg.model.name, train_set.num_classes, train_set.image_shape,
                            **cfg.model.options)

    backend = make_backend(backend_name, layout, cfg.dist, device)
    backend.setup()
    limit = cfg.dist.timeout_s + (0 if backend.name == "horovod" else WATCHDOG_GRACE_S)
    watchdog = Watchdog(limit, layout.rank).start()
    try:
        try:
            summary = _train(cfg, layout, plan, backend, raw_model, train_set, val_set,
                             steps_per_epoch, device, threads, out, resume, stop, watchdog)
        except Preempted:  # every rank agreed to stop: leave together
            backend.barrier()
            backend.shutdown()
            raise
        backend.shutdown()  # not after other errors: a dead peer could make it block
    finally:
        watchdog.stop()  # never outlive run(): an API caller's process must not be killed later
    return summary


def load_from_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` overrides to an existing config."""
    from scalelab.train.config import apply_overrides

    return from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


# ----------------------------------------------------------------------------- the loop

def _train(cfg: RunConfig, layout: Layout, plan: BatchPlan, backend: Backend,
           raw_model: torch.nn.Module, train_set, val_set, steps_per_epoch: int,
           device: torch.device, threads: int | None, out: Path, resume: bool,
           stop: StopRequest, watchdog: Watchdog) -> dict[str, Any]:
    main = layout.is_main
    epochs = cfg.train.epochs
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    channels_last = cfg.train.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    prefetch = cfg.data.prefetch if cfg.data.prefetch is not None else device.type == "cuda"

    # --- model, optimizer, schedule, parallelism
    raw_model = backend.prepare(raw_model, cfg.model.sync_batchnorm)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, raw_model, plan.lr)
    model, optimizer = backend.wrap(raw_model, optimizer, plan.accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(cfg, steps_per_epoch))
    if cfg.train.compile:
        model = torch.compile(model)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    timer = PhaseTimer(device)  # CUDA events on GPUs, the host clock on the CPU
    timer.attach(optimizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # --- the run directory describes itself
    ckpt_dir = out / "checkpoints"
    hostnames = backend.gather_object(socket.gethostname())
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "run")  # a run directory: what scalelab may resume or replace
        from scalelab.provenance import record_start

        record_start(cfg, out, resume=resume)  # RUN_DIR/provenance.json, once input passed
        if not resume:
            for stale in ("metrics.jsonl", "model.pt"):
                (out / stale).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        info = _run_info(cfg, layout, plan, backend, device, threads, hostnames, steps_per_epoch,
                         use_bf16, channels_last, resume)
        atomic_write_json(out / "run_info.json", info)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=main)
    metrics.write({"kind": "start", "world_size": layout.world_size, "backend": backend.name,
                   "launcher": layout.launcher, "hostnames": hostnames, "resume": resume})

    # --- resume: position, states and history from the newest valid checkpoint
    start_epoch, start_step, global_step, resumes = 0, 0, 0, 0
    stats, history = EpochStats(), []
    _seed_everything(cfg.seed + 1 + layout.rank)  # per-rank streams (dropout)
    if resume:
        found = ckpt.find_latest(ckpt_dir) if main else None
        name = backend.broadcast_object(found[0].name if found else None)
        if name is None:
            if main:
                print(f"scalelab train: no checkpoint in {ckpt_dir}; starting from scratch")
        else:
            state = found[1] if main else ckpt.load(ckpt_dir / name)
            saved = (state.get("global_batch"), state.get("steps_per_epoch"))
            if saved != (plan.global_batch, steps_per_epoch):
                raise UsageError(
                    f"--resume: checkpoint {name} was taken with global batch {saved[0]} and "
                    f"{saved[1]} steps per epoch, this config gives {plan.global_batch} and "
                    f"{steps_per_epoch}: the position in the epoch would not carry over")
            try:
                backend.load_full_state(raw_model, optimizer, state["model"], state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise UsageError(f"--resume: checkpoint {name} does not fit this model/"
                                 f"optimizer: {str(exc).splitlines()[0]}") from None
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, start_step = state["epoch"], state["step_in_epoch"]
            global_step, resumes = state["global_step"], state.get("resumes", 0) + 1
            stats, history = EpochStats(**state["stats"]), list(state["history"])
            if len(state["rng"]) == layout.world_size:
                ckpt.set_rng_state(state["rng"][layout.rank])
            elif main:
                print("scalelab train: warning: world size changed since the checkpoint; "
                      "RNG streams restart (data order is unaffected)", file=sys.stderr)
            backend.sync_state(raw_model, optimizer)
            if main:
                print(f"scalelab train: resumed from {name} at epoch {start_epoch + 1} "
                      f"step {start_step}")
            metrics.write({"kind": "resume", "checkpoint": name, "epoch": start_epoch,
                           "step_in_epoch": start_step, "global_step": global_step})

    def save_checkpoint(epoch_pos: int, step_pos: int) -> Path:
        """All ranks call this; rank 0 writes."""
        watchdog.beat()
        rngs = backend.gather_object(ckpt.rng_state())
        path = ckpt.path_for(ckpt_dir, global_step)
        model_state, optim_state = backend.full_state(raw_model, optimizer)  # all ranks
        if main:
            ckpt.save(path, {
                "model": model_state, "optimizer": optim_state,
                "scheduler": scheduler.state_dict(), "epoch": epoch_pos,
                "step_in_epoch": step_pos, "global_step": global_step, "rng": rngs,
                "stats": stats.to_dict(), "history": history, "config": cfg.to_dict(),
                "resumes": resumes, "world_size": layout.world_size, "backend": backend.name,
                "global_batch": plan.global_batch, "steps_per_epoch": steps_per_epoch,
            })
            ckpt.prune(ckpt_dir, cfg.checkpoint.keep)
        backend.barrier()
        watchdog.beat()
        return path

    def finish_reduction(result, info: dict[str, Any]) -> bool:
        """Wait for one metrics reduction; book it; return whether some rank asked to stop."""
        flag, loss_sum, correct, count = result()
        stats.loss_sum += loss_sum
        stats.correct += correct
        stats.count += count
        n = info["steps"]
        metrics.write({
            "kind": "step", "epoch": info["epoch"], "step": info["step"],
            "global_step": info["global_step"], "loss": loss_sum / count, "acc": correct / count,
            "lr": info["lr"], "step_time": info["time"] / n,
            "samples_per_s": plan.global_batch * n / info["time"],
            "data_s": info["data"] / n,
            "comm_s": info["comm"] / n if backend.measures_comm else None,
        })
        bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        return flag > 0

    show_bar = main and (cfg.train.progress if cfg.train.progress is not None
                         else sys.stderr.isatty())
    log_every = cfg.metrics.log_every
    process_steps = 0  # steps run by this process (warm-up exclusion restarts on resume)
    model.train()
    for epoch in range(start_epoch, epochs):
        first = start_step if epoch == start_epoch else 0
        if epoch != start_epoch:
            stats = EpochStats()
        stats.comm_measured = backend.measures_comm
        order = epoch_order(cfg.seed, epoch, len(train_set))
        batches = Batches(train_set, rank_batches(order, first, steps_per_epoch,
                                                  plan.global_batch, backend.dp_rank,
                                                  plan.per_rank_batch),
                          device, channels_last, prefetch)
        bar = _progress(show_bar, epoch, epochs, first, steps_per_epoch)
        pending = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        interval = {"steps": 0, "time": 0.0, "data": 0.0, "comm": 0.0}
        inflight: list[tuple[Any, dict[str, Any]]] = []  # started metric reductions
        epoch_start = t_prev = time.perf_counter()

        for step in range(first, steps_per_epoch):
            # data
            timer.mark("start")
            t0 = time.perf_counter()
            x, y = next(batches)
            t_data = time.perf_counter() - t0
            timer.mark("ready")
            # forward/backward over micro-batches; gradients averaged on the last one
            mb = plan.micro_batch
            for micro in range(plan.accum_steps):
                xs, ys = x[micro * mb:(micro + 1) * mb], y[micro * mb:(micro + 1) * mb]
                last = micro == plan.accum_steps - 1
                with contextlib.nullcontext() if last else backend.no_sync(model):
                    with autocast:
                        logits = model(xs)
                        loss = F.cross_entropy(logits, ys)
                    (loss / plan.accum_steps).backward()
                with torch.no_grad():
                    # per target: a sample's label, or a token of a sequence (gpt)
                    pending += torch.stack([loss.detach().double() * ys.numel(),
                                            (logits.argmax(1) == ys).sum().double(),
                                            torch.tensor(float(ys.numel()), device=device,
                                                         dtype=torch.float64)])
            timer.mark("backward")
            t_comm = backend.step(optimizer, params, cfg.optim.grad_clip)
            optimizer.zero_grad()  # set_to_none (the default) frees grads early
            scheduler.step()
            global_step += 1
            process_steps += 1
            watchdog.beat()

            # timing (rank 0's clock; all ranks move in lockstep)
            now = time.perf_counter()
            step_s, t_prev = now - t_prev, now
            timer.end(step_s, t_data, t_comm)
            if process_steps > cfg.metrics.warmup_steps:
                stats.timed_samples += plan.global_batch
                stats.timed_s += step_s
            interval["steps"] += 1
            interval["time"] += step_s
            bar.update(1)

            # sync point: sum metrics and the stop flag over ranks. The reduction runs
            # while the next step computes; its result is read at the next sync point
            # (or at once at the end of the epoch), the same step on every rank.
            last_step = step == steps_per_epoch - 1
            every = cfg.checkpoint.every_steps
            ckpt_due = bool(every) and global_step % every == 0 and not last_step
            if global_step % log_every == 0 or last_step or ckpt_due:
                data_s, compute_s, comm_s = timer.collect()  # GPU: one sync per interval
                stats.data_s += data_s
                stats.compute_s += compute_s
                stats.comm_s += comm_s
                interval["data"] += data_s
                interval["comm"] += comm_s
                flag = torch.tensor([float(stop.requested)], dtype=torch.float64, device=device)
                inflight.append((backend.allreduce_async(torch.cat([flag, pending])), {
                    "epoch": epoch, "step": step + 1, "global_step": global_step,
                    "lr": scheduler.get_last_lr()[0], **interval}))
                pending = torch.zeros(3, dtype=torch.float64, device=device)
                interval = dict.fromkeys(interval, 0)
                stop_now = False
                while len(inflight) > 1 or (inflight and (last_step or ckpt_due)):
                    stop_now |= finish_reduction(*inflight.pop(0))
                if stop_now:
                    while inflight:
                        finish_reduction(*inflight.pop(0))
                    stats.wall_s += time.perf_counter() - epoch_start
                    path = save_checkpoint(epoch, step + 1)
                    metrics.write({"kind": "preempted", "signal": stop.name or "peer",
                                   "epoch": epoch, "step_in_epoch": step + 1,
                                   "global_step": global_step, "checkpoint": path.name})
                    metrics.close()
                    # No rank leaves before the record is written: srun --kill-on-bad-exit
                    # ends the step when the first rank exits 75.
                    backend.barrier()
                    bar.close()
                    raise Preempted(
                        f"stop signal {stop.name or '(on another rank)'}: checkpoint "
                        f"{path} at epoch {epoch + 1} step {step + 1}; rerun with --resume")

            if ckpt_due:  # statistics are complete here: the sync point above drained them
                stats.wall_s += time.perf_counter() - epoch_start
                epoch_start = time.perf_counter()
                save_checkpoint(epoch, step + 1)
                t_prev = time.perf_counter()  # the write is not step time
        bar.close()

        # --- end of epoch: validate, report, checkpoint
        is_last = epoch == epochs - 1
        val_loss = val_acc = None
        if val_set is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0 or is_last):
            val_loss, val_acc = evaluate(raw_model, val_set, backend, device, plan.per_rank_batch,
                                         channels_last, autocast, watchdog)
        stats.wall_s += time.perf_counter() - epoch_start
        record = {
            "kind": "epoch", "epoch": epoch, "epochs": epochs, "global_step": global_step,
            "train_loss": stats.loss_sum / stats.count if stats.count else None,
            "train_acc": stats.correct / stats.count if stats.count else None,
            "val_loss": val_loss, "val_acc": val_acc,
            "samples_per_s": stats.timed_samples / stats.timed_s if stats.timed_s else None,
            "timed_samples": stats.timed_samples, "timed_s": stats.timed_s,
            "time_s": stats.wall_s, "data_s": stats.data_s, "compute_s": stats.compute_s,
            "comm_s": stats.comm_s if stats.comm_measured else None,
        }
        history.append(record)
        metrics.write(record)
        metrics.sync()
        if main:
            print(format_epoch_line(record), flush=True)
        every = cfg.checkpoint.every_epochs
        stats = EpochStats()
        if is_last or (every and (epoch + 1) % every == 0):
            save_checkpoint(epoch + 1, 0)

    # --- the end: final weights, then the summary (its presence = completed)
    final_state = backend.full_state(raw_model, None)[0]  # all ranks (gathers when sharded)
    if main:
        atomic_write(out / "model.pt", lambda fh: torch.save(final_state, fh))
    summary = _summary(cfg, layout, plan, backend, history, global_step, steps_per_epoch,
                       resumes, device)
    summary.update(model_facts(cfg.model.name, cfg.model.options, train_set.num_classes,
                               train_set.image_shape, raw_model, device,
                               summary["samples_per_s_per_rank"], use_bf16))
    summary.update(backend.memory_facts())
    summary.update(lm_facts(raw_model, summary, device, peak_bf16))
    metrics.write({"kind": "end", "global_step": global_step,
                   "samples_per_s": summary["samples_per_s"]})
    metrics.close()
    if main:
        atomic_write_json(out / "summary.json", summary)
    backend.barrier()
    return summary


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, backend: Backend, device: torch.device,
             batch: int, channels_last: bool, autocast, watchdog: Watchdog
             ) -> tuple[float, float]:
    """Mean loss and accuracy over the whole split; each rank evaluates its own share."""
    was_training = model.training
    model.eval()
    idx = eval_shard(len(dataset), backend.dp_rank, backend.dp_size)
    # As many chunks on every rank (shares differ by one sample): fsdp/tp forwards are
    # collectives, and a rank with one chunk more would wait for its peers forever.
    count = math.ceil(math.ceil(len(dataset) / backend.dp_size) / batch)
    chunks = (c for c in np.array_split(idx, max(1, count)) if len(c))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in Batches(dataset, chunks, device, channels_last, prefetch=False):
        with autocast:
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum().double()
        sums[2] += y.numel()  # targets: labels, or tokens of sequences
        watchdog.beat()
    model.train(was_training)
    loss_sum, correct, count = backend.allreduce(sums.tolist())
    return loss_sum / count, correct / count


# ----------------------------------------------------------------------------- helpers

def _check_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
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
    if not Path(d.path).exists():
        raise UsageError(f"field 'data.path': no such file or directory: {d.path}")
    path = d.path
    if d.localize and d.source == "staged":
        # Every rank asks; the first on each node copies, the others wait for it.
        from scalelab.data.nodelocal import localize

        try:
            path = str(localize(d.path, d.scratch, progress=False))
        except (DataError, OSError) as exc:
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
        except (DataError, OSError, KeyError, ValueError) as exc:
            raise UsageError(f"field '{field_name}': {split!r} in {path}: {exc}") from None
    train, val = splits
    if len(train) == 0:
        raise UsageError(f"field 'data.train_split': {d.train_split!r} in {d.path} is empty")
    if val is not None and len(val) == 0:
        raise UsageError(f"field 'data.val_split': {d.val_split!r} in {d.path} is empty; "
                         "stage with a validation fraction > 0, or set data.val_split: null")
    if val is not None and (val.image_shape != train.image_shape
                            or val.num_classes != train.num_classes):
        raise UsageError(f"field 'data.val_split': {d.val_split!r} has shape {val.image_shape} "
                         f"and {val.num_classes} classes, unlike the training split")
    return train, val


def pick_device(want: str, layout: Layout) -> torch.device:
    """The local rank's GPU, or the CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("field 'train.device': 'cuda' requested but no GPU is visible")
    return torch.device("cuda", layout.local_rank % torch.cuda.device_count())


def _configure_torch(cfg: RunConfig, layout: Layout, device: torch.device) -> int | None:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_optimizer(cfg: RunConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def _lr_factor(cfg: RunConfig, steps_per_epoch: int):
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


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(show: bool, epoch: int, epochs: int, first: int, total: int):
    if not show:
        return _NoBar()
    from scalelab.data.progress import Progress

    return Progress(f"epoch {epoch + 1}/{epochs}", total, "steps", initial=first).__enter__()


def _run_info(cfg: RunConfig, layout: Layout, plan: BatchPlan, backend: Backend,
              device: torch.device, threads: int | None, hostnames: list[str],
              steps_per_epoch: int, use_bf16: bool, channels_last: bool,
              resume: bool) -> dict[str, Any]:
    try:
        import horovod

        hvd_version = horovod.__version__
    except ImportError:
        hvd_version = None
    from scalelab.container.wiring import inside_image_info

    return {
        "layout": asdict(layout), "hostnames": hostnames, "backend": backend.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "threads_per_rank": threads, "plan": asdict(plan), "steps_per_epoch": steps_per_epoch,
        "precision": "bf16" if use_bf16 else "fp32", "channels_last": channels_last,
        "compile": cfg.train.compile, "deterministic": cfg.train.deterministic,
        "resume": resume, "argv": sys.argv, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "horovod": hvd_version, "numpy": np.__version__},
        "container": inside_image_info(),  # None on the host; proof of the image otherwise
    }


def _summary(cfg: RunConfig, layout: Layout, plan: BatchPlan, backend: Backend,
             history: list[dict[str, Any]], global_step: int, steps_per_epoch: int,
             resumes: int, device: torch.device) -> dict[str, Any]:
    last = history[-1] if history else {}
    rate = throughput(history)
    comm = [e["comm_s"] for e in history if e["comm_s"] is not None]
    return {
        "status": "completed", "epochs": cfg.train.epochs, "global_steps": global_step,
        "steps_per_epoch": steps_per_epoch, "world_size": layout.world_size,
        "backend": backend.name, "launcher": layout.launcher, "device": str(device),
        "global_batch_size": plan.global_batch, "per_rank_batch_size": plan.per_rank_batch,
        "grad_accum_steps": plan.accum_steps, "lr": plan.lr,
        "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
        "val_loss": last.get("val_loss"), "val_acc": last.get("val_acc"),
        "samples_per_s": rate,
        "samples_per_s_per_rank": rate / layout.world_size if rate else None,
        "throughput_excludes": "first epoch" if len(history) > 1 else
        f"first {cfg.metrics.warmup_steps} steps",
        "time_s": sum(e["time_s"] for e in history),
        "time_split_s": {
            "data": sum(e["data_s"] for e in history),
            "compute": sum(e["compute_s"] for e in history),
            "comm": sum(comm) if comm else None,
        },
        "resumes": resumes, "model_file": "model.pt",
    }
