"""The training loop: ``Trainer.fit`` -> one epoch -> ``train_step``, read top to bottom.

``run`` validates everything that can be wrong with the input *before* any
process group exists or any file is written (so bad input fails fast, on
every rank alike, with exit 2), builds the job (:mod:`scalelab.train.setup`)
and hands it to a :class:`Trainer`. Parallelism lives in the backend
(:mod:`scalelab.backends`), the data order in :mod:`scalelab.train.sampling`,
the run's position and history in :class:`~scalelab.train.state.TrainState`,
the metric reductions in :class:`~scalelab.train.reducer.MetricsReducer`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scalelab.backends import Backend, choose_backend, make_backend
from scalelab.data.spec import DataSpec
from scalelab.energy import open_meter
from scalelab.energy import total as energy_total
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write, atomic_write_json
from scalelab.layout import detect
from scalelab.models import build
from scalelab.train import checkpoint as ckpt
from scalelab.train.config import Parallelism, RunConfig, from_dict, load, resolve_batch
from scalelab.train.metrics import epoch_record, format_epoch_line
from scalelab.train.records import run_info, summary
from scalelab.train.reducer import MetricsReducer
from scalelab.train.sampling import Batches, epoch_order, eval_shard, rank_batches
from scalelab.train.setup import (
    Job,
    build_job,
    check_run_dir,
    configure_torch,
    describe_run_dir,
    open_datasets,
    pick_device,
    seed_everything,
    steps_per_epoch,
)
from scalelab.train.signals import Preempted, StopRequest
from scalelab.train.state import TrainState
from scalelab.train.watchdog import Watchdog


def run(config: RunConfig | dict | str | Path, out_dir: str | Path, *,
        resume: bool = False, overrides: list[str] | None = None,
        reshard: bool = False) -> dict[str, Any]:
    """Train as configured, writing RUN_DIR = ``out_dir``; return the summary dict.

    ``config`` is a RunConfig, a nested dict or a YAML path. ``reshard`` lets a
    resume continue from a checkpoint written at another world size or tp. Raises
    UsageError for bad input (nothing written), Preempted after a stop signal
    (checkpoint written). Every rank of the job calls this.
    """
    if reshard and not resume:
        raise UsageError("--reshard: only with --resume (it lets a resume change the layout)")
    stop = StopRequest().install()  # early: a signal during start-up must not kill us
    try:
        return _run(config, Path(out_dir), resume, reshard, overrides or [], stop)
    finally:
        stop.restore()


def _run(config: RunConfig | dict | str | Path, out: Path, resume: bool, reshard: bool,
         overrides: list[str], stop: StopRequest) -> dict[str, Any]:
    cfg = _load(config, overrides)
    layout = detect()
    backend_name = choose_backend(cfg.dist.backend, layout, cfg.dist.tp, cfg.model.name,
                                  cfg.model.options)
    plan = resolve_batch(cfg, Parallelism(layout.world_size, cfg.dist.tp))
    done = check_run_dir(out, resume)
    if done is not None:
        if layout.is_main:
            print(f"scalelab train: {out} already holds a completed run; nothing to do")
        return done
    train_set, val_set = open_datasets(cfg)
    data = (train_set, val_set, steps_per_epoch(cfg, plan, train_set))
    device = pick_device(cfg.train.device, layout)
    threads = configure_torch(cfg, layout, device)
    seed_everything(cfg.seed)  # same initial weights on every rank
    raw_model = build(cfg.model.name, cfg.model.options, DataSpec.of(train_set))

    backend = make_backend(backend_name, layout, cfg.dist, device)
    backend.setup()
    watchdog = Watchdog(backend.watchdog_limit_s, layout.rank).start()
    try:
        try:
            job = build_job(cfg, layout, plan, backend, raw_model, data, device, threads, out,
                            resume, reshard=reshard)
            result = Trainer(job, stop, watchdog).fit()
        except Preempted:  # every rank agreed to stop: leave together
            backend.barrier()
            backend.shutdown()
            raise
        backend.shutdown()  # not after other errors: a dead peer could make it block
    finally:
        watchdog.stop()  # never outlive run(): an API caller's process must not be killed later
    return result


def _load(config: RunConfig | dict | str | Path, overrides: list[str]) -> RunConfig:
    if isinstance(config, RunConfig):
        return load_from_config(config, overrides)
    if isinstance(config, dict):
        return load_from_config(from_dict(config), overrides)
    return load(config, overrides)


def load_from_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` overrides to an existing config."""
    from scalelab.train.config import apply_overrides

    return from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """One rank's run: owns its state, its metric reductions and its checkpoints."""

    def __init__(self, job: Job, stop: StopRequest, watchdog: Watchdog) -> None:
        self.job, self.stop, self.watchdog = job, stop, watchdog
        self.state = TrainState()
        self.reducer = MetricsReducer(job.backend, job.device, job.metrics,
                                      job.plan.global_batch)
        self.ckpt_dir = job.out / "checkpoints"
        self.process_steps = 0  # steps run by this process (warm-up exclusion restarts on resume)
        self.bar: Any = _NoBar()
        self.clock = _Clock()
        self.energy = open_meter(job.cfg.metrics.energy, _gpu_uuid(job.device),
                                 job.layout.local_rank)
        self.epoch_energy: list[float] | None = None  # this rank's, until summed
        self.epoch_samples, self.epoch_energy_s, self.energy_since = 0, 0.0, 0.0

    def fit(self) -> dict[str, Any]:
        """Resume if asked, run the remaining epochs, write model.pt and summary.json."""
        job = self.job
        describe_run_dir(job, run_info(job))
        job.metrics.write({"kind": "start", "world_size": job.layout.world_size,
                           "backend": job.backend.name, "launcher": job.layout.launcher,
                           "hostnames": job.hostnames, "resume": job.resume})
        seed_everything(job.cfg.seed + 1 + job.layout.rank)  # per-rank streams (dropout)
        if job.resume:
            self.resume()
        job.model.train()
        for epoch in range(self.state.epoch, job.cfg.train.epochs):
            self.state.stats.comm_measured = job.backend.measures_comm
            self.run_epoch(epoch)
            self.end_epoch(epoch)
        return self.finish()

    def run_epoch(self, epoch: int) -> None:
        job, plan = self.job, self.job.plan
        first = self.state.step_in_epoch
        order = epoch_order(job.cfg.seed, epoch, len(job.train_set))
        batches = Batches(job.train_set, rank_batches(order, first, job.steps_per_epoch,
                                                      plan.global_batch, job.backend.dp_rank,
                                                      plan.per_rank_batch),
                          job.device, job.channels_last, job.prefetch)
        self.bar = _progress(self._show_bar(), epoch, job.cfg.train.epochs, first,
                             job.steps_per_epoch)
        self.clock = _Clock()
        self._energy_mark()
        for step in range(first, job.steps_per_epoch):
            job.timer.mark("start")
            t0 = time.perf_counter()
            x, y = next(batches)
            t_data = time.perf_counter() - t0
            job.timer.mark("ready")
            t_comm = self.train_step(x, y)
            self.after_step(step, t_data, t_comm)
        self.bar.close()
        self._energy_mark(samples=(job.steps_per_epoch - first) * plan.global_batch)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Forward/backward over the micro-batches (gradients averaged on the last), update.
        Returns the seconds the backend waited for gradient communication, if it knows."""
        job, plan = self.job, self.job.plan
        mb = plan.micro_batch
        for micro in range(plan.accum_steps):
            xs, ys = x[micro * mb:(micro + 1) * mb], y[micro * mb:(micro + 1) * mb]
            last = micro == plan.accum_steps - 1
            with contextlib.nullcontext() if last else job.backend.no_sync(job.model):
                with job.autocast:
                    logits = job.model(xs)
                    loss = F.cross_entropy(logits, ys)
                (loss / plan.accum_steps).backward()
            self.reducer.add(loss, logits, ys)
        job.timer.mark("backward")
        t_comm = job.backend.step(job.optimizer, job.params, job.cfg.optim.grad_clip)
        job.optimizer.zero_grad()  # set_to_none (the default) frees grads early
        job.scheduler.step()
        return t_comm

    def after_step(self, step: int, t_data: float, t_comm: float | None) -> None:
        """Count the step; at a sync point reduce metrics and the stop flag; checkpoint."""
        job, st = self.job, self.state
        st.global_step += 1
        st.step_in_epoch = step + 1
        self.process_steps += 1
        self.watchdog.beat()
        step_s = self.clock.step()  # rank 0's clock; all ranks move in lockstep
        job.timer.end(step_s, t_data, t_comm)
        if self.process_steps > job.cfg.metrics.warmup_steps:
            st.stats.timed_samples += job.plan.global_batch
            st.stats.timed_s += step_s
        self.reducer.step_done(step_s)
        self.bar.update(1)
        last_step = step == job.steps_per_epoch - 1
        every = job.cfg.checkpoint.every_steps
        ckpt_due = bool(every) and st.global_step % every == 0 and not last_step
        if st.global_step % job.cfg.metrics.log_every == 0 or last_step or ckpt_due:
            self.sync(drain=last_step or ckpt_due)
        if ckpt_due:  # statistics are complete here: the sync point drained them
            st.stats.wall_s += self.clock.epoch()
            self.save_checkpoint()
            self.clock.skip()  # the write is not step time

    def sync(self, drain: bool) -> None:
        """Start this interval's reduction; book the previous one (all of them if ``drain``).
        The reduction runs while the next step computes; its result is read at the next sync
        point, the same step on every rank, so all ranks agree on a stop."""
        job, st = self.job, self.state
        data_s, compute_s, comm_s = job.timer.collect()  # GPU: one sync per interval
        st.stats.data_s += data_s
        st.stats.compute_s += compute_s
        st.stats.comm_s += comm_s
        where = {"epoch": st.epoch, "step": st.step_in_epoch, "global_step": st.global_step,
                 "lr": job.scheduler.get_last_lr()[0]}
        self.reducer.start(self.stop.requested, data_s, comm_s, where)
        if self.reducer.finish(st.stats, self.bar, keep=0 if drain else 1):
            self.preempt()

    def preempt(self) -> None:
        """Some rank was asked to stop: checkpoint here, record it, leave together."""
        job, st = self.job, self.state
        self.reducer.finish(st.stats, self.bar)
        st.stats.wall_s += self.clock.epoch()
        path = self.save_checkpoint()
        job.metrics.write({"kind": "preempted", "signal": self.stop.name or "peer",
                           "epoch": st.epoch, "step_in_epoch": st.step_in_epoch,
                           "global_step": st.global_step, "checkpoint": path.name})
        job.metrics.close()
        # No rank leaves before the record is written: srun --kill-on-bad-exit ends the step
        # when the first rank exits 75.
        job.backend.barrier()
        self.bar.close()
        raise Preempted(f"stop signal {self.stop.name or '(on another rank)'}: checkpoint "
                        f"{path} at epoch {st.epoch + 1} step {st.step_in_epoch}; "
                        "rerun with --resume")

    def end_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, move on, checkpoint when due."""
        job, st, cfg = self.job, self.state, self.job.cfg
        is_last = epoch == cfg.train.epochs - 1
        val = (None, None)
        if job.val_set is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0 or is_last):
            val = evaluate(job.raw_model, job.val_set, job.backend, job.device,
                           job.plan.per_rank_batch, job.channels_last, job.autocast,
                           self.watchdog)
        st.stats.wall_s += self.clock.epoch()
        record = epoch_record(st.stats, epoch, cfg.train.epochs, st.global_step, *val)
        record.update(self._epoch_energy())
        st.history.append(record)
        job.metrics.write(record)
        job.metrics.sync()
        if job.main:
            print(format_epoch_line(record), flush=True)
        st.next_epoch()
        every = cfg.checkpoint.every_epochs
        if is_last or (every and (epoch + 1) % every == 0):
            self.save_checkpoint()

    def _energy_mark(self, samples: int | None = None) -> None:
        """Read the energy counters: at an epoch's start (discarded) and after its last
        step (kept with the samples trained since the start, validation excluded)."""
        if not self.job.cfg.metrics.energy:
            return
        vector, now = self.energy.vector(), time.perf_counter()
        if samples is not None:
            self.epoch_energy, self.epoch_samples = vector, samples
            self.epoch_energy_s = now - self.energy_since
        self.energy_since = now

    def _epoch_energy(self) -> dict[str, Any]:
        """The epoch's joules summed over ranks (one small collective per epoch)."""
        if self.epoch_energy is None:
            return {}
        dev = self.job.device
        summed = self.job.backend.allreduce_async(
            torch.tensor(self.epoch_energy, dtype=torch.float64, device=dev))()
        joules, sources = energy_total(summed)
        self.epoch_energy = None
        return {"energy_j": joules, "energy_sources": sources,
                "energy_samples": self.epoch_samples, "energy_s": self.epoch_energy_s}

    def finish(self) -> dict[str, Any]:
        """Final weights, then the summary (its presence marks the run completed)."""
        job = self.job
        final_state = job.backend.full_state(job.raw_model, None)[0]  # all ranks (gathers)
        if job.main:
            atomic_write(job.out / "model.pt", lambda fh: torch.save(final_state, fh))
        result = summary(job, self.state, self.energy.reasons)
        job.metrics.write({"kind": "end", "global_step": self.state.global_step,
                           "samples_per_s": result["samples_per_s"]})
        job.metrics.close()
        if job.main:
            atomic_write_json(job.out / "summary.json", result)
        job.backend.barrier()
        return result

    # ------------------------------------------------------------------- checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        """Everything in a checkpoint but the weights and optimizer state (a collective:
        it gathers every rank's RNG states)."""
        job = self.job
        rngs = job.backend.gather_object(ckpt.rng_state())
        return {"scheduler": job.scheduler.state_dict(), **self.state.state_dict(),
                "rng": rngs, "config": job.cfg.to_dict(), "world_size": job.layout.world_size,
                "backend": job.backend.name, "global_batch": job.plan.global_batch,
                "steps_per_epoch": job.steps_per_epoch}

    def save_checkpoint(self) -> Path:
        """All ranks call this. Sharded backends write a distributed checkpoint (each rank
        its shards); the others one file from rank 0, gathered. Atomic, checksummed."""
        job = self.job
        self.watchdog.beat()
        sharded = job.backend.shards_state
        path = ckpt.path_for(self.ckpt_dir, self.state.global_step, sharded)
        meta = self.checkpoint_meta()
        if sharded:
            ckpt.save_sharded(path, job.raw_model, job.optimizer, meta, job.layout.rank,
                              job.backend.barrier)
        else:
            model_state, optim_state = job.backend.full_state(job.raw_model, job.optimizer)
            if job.main:
                ckpt.save(path, {"model": model_state, "optimizer": optim_state, **meta})
        if job.main:
            ckpt.prune(self.ckpt_dir, job.cfg.checkpoint.keep)
        job.backend.barrier()
        self.watchdog.beat()
        return path

    def resume(self) -> None:
        """Continue from the newest valid checkpoint: weights, schedule, position, RNG."""
        job = self.job
        found = ckpt.find_latest(self.ckpt_dir) if job.main else None
        name = job.backend.broadcast_object(found[0].name if found else None)
        if name is None:
            if job.main:
                print(f"scalelab train: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return
        # rank 0 verified the checksums before naming the checkpoint to every rank
        saved = found[1] if found else ckpt.load(self.ckpt_dir / name, verified=True)
        self._check_position(name, saved)
        try:
            if ckpt.is_sharded(Path(name)):
                ckpt.load_sharded(self.ckpt_dir / name, job.raw_model, job.optimizer)
            else:
                job.backend.load_full_state(job.raw_model, job.optimizer, saved["model"],
                                            saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(f"--resume: checkpoint {name} does not fit this model/"
                             f"optimizer: {str(exc).splitlines()[0]}") from None
        job.scheduler.load_state_dict(saved["scheduler"])
        self.state.load_state_dict(saved)
        self.state.resumes += 1
        self._restore_rng(saved["rng"])
        job.backend.sync_state(job.raw_model, job.optimizer)
        if job.main:
            print(f"scalelab train: resumed from {name} at epoch {self.state.epoch + 1} "
                  f"step {self.state.step_in_epoch}")
        job.metrics.write({"kind": "resume", "checkpoint": name, "epoch": self.state.epoch,
                           "step_in_epoch": self.state.step_in_epoch,
                           "global_step": self.state.global_step})

    def _check_position(self, name: str, saved: dict[str, Any]) -> None:
        """The position in an epoch carries over only with the same batches per epoch; the
        layout (world size, tp) changes only when asked (a different layout is a different
        sweep point, so it must not happen by accident); and the checkpoint's config must
        be this run's (a checkpoint copied from another run is refused, naming the field)."""
        job = self.job
        was = (saved.get("world_size"), saved["config"].get("dist", {}).get("tp", 1))
        now = (job.layout.world_size, job.cfg.dist.tp)
        if was != now and not job.reshard:
            raise UsageError(
                f"--resume: checkpoint {name} was written by {was[0]} ranks (tp {was[1]}), "
                f"this job has {now[0]} (tp {now[1]}); pass --reshard to continue the run at "
                "the new layout")
        differ = ckpt.config_differences(saved["config"], job.cfg.to_dict(), job.reshard)
        if differ:
            raise UsageError(
                f"--resume: checkpoint {name} belongs to another run: {differ[0]}"
                + (f" (and {len(differ) - 1} more field(s))" if len(differ) > 1 else "")
                + "; resume it with its own config, or start a new run directory")
        have = (saved.get("global_batch"), saved.get("steps_per_epoch"))
        if have != (job.plan.global_batch, job.steps_per_epoch):
            raise UsageError(
                f"--resume: checkpoint {name} was taken with global batch {have[0]} and "
                f"{have[1]} steps per epoch, this config gives {job.plan.global_batch} and "
                f"{job.steps_per_epoch}: the position in the epoch would not carry over")

    def _restore_rng(self, rngs: list[dict[str, Any]]) -> None:
        if len(rngs) == self.job.layout.world_size:
            ckpt.set_rng_state(rngs[self.job.layout.rank])
        elif self.job.main:
            print("scalelab train: warning: world size changed since the checkpoint; "
                  "RNG streams restart (data order is unaffected)", file=sys.stderr)

    def _show_bar(self) -> bool:
        progress = self.job.cfg.train.progress
        return self.job.main and (progress if progress is not None else sys.stderr.isatty())


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


def _gpu_uuid(device: torch.device) -> str | None:
    """The UUID NVML knows this rank's GPU by (None on the CPU)."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


class _Clock:
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


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(show: bool, epoch: int, epochs: int, first: int, total: int):
    if not show:
        return _NoBar()
    from scalelab.data.progress import Progress

    return Progress(f"epoch {epoch + 1}/{epochs}", total, "steps", initial=first).__enter__()
