"""The training loop: ``Trainer.fit`` -> one epoch -> ``train_step``, read top to bottom.

``run`` validates everything that can be wrong with the input *before* any
process group exists or any file is written (so bad input fails fast, on
every rank alike, with exit 2), builds the job (:mod:`scalelab.train.setup`)
and hands it to a :class:`Trainer`. Parallelism lives in the backend
(:mod:`scalelab.backends`), the data order in :mod:`scalelab.train.sampling`,
the run's position and history in :class:`~scalelab.train.state.TrainState`,
the metric reductions in :class:`~scalelab.train.reducer.MetricsReducer`, the
checkpoints in :class:`~scalelab.train.checkpoint.Checkpointer` and the energy
readings in :class:`~scalelab.train.energy_ledger.EnergyLedger`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scalelab.backends import ParallelDims, choose_backend, make_backend
from scalelab.data.progress import Progress
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.layout import Layout, detect
from scalelab.models import build
from scalelab.tracking.config import RunSettings
from scalelab.tracking.live import RunTracker
from scalelab.train.batch import check_elastic, resolve_batch
from scalelab.train.checkpoint import Checkpointer
from scalelab.train.config import RunConfig, apply_overrides, from_dict, load
from scalelab.train.energy_ledger import EnergyLedger
from scalelab.train.evaluation import evaluate
from scalelab.train.records import epoch_record, format_epoch_line, run_info, summary
from scalelab.train.reducer import MetricsReducer
from scalelab.train.sampling import Batches, epoch_order, rank_batches
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
from scalelab.train.timing import StepClock
from scalelab.train.watchdog import Watchdog


def run(
    config: RunConfig | dict | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overrides: list[str] | None = None,
    reshard: bool = False,
    tracking: RunSettings | None = None,
) -> dict[str, Any]:
    """Train as configured, writing RUN_DIR = ``out_dir``; return the summary dict.

    ``config`` is a RunConfig, a nested dict or a YAML path. ``reshard`` lets a
    resume continue from a checkpoint written at another world size or tp.
    ``tracking``: settings rank 0 writes into RUN_DIR before training (None: those a
    launch left there, if any). Raises
    UsageError for bad input (nothing written), Preempted after a stop signal
    (checkpoint written). Every rank of the job calls this.
    """
    if reshard and not resume:
        raise UsageError("--reshard: only with --resume (it lets a resume change the layout)")
    stop = StopRequest().install()  # early: a signal during start-up must not kill us
    try:
        return _run(config, Path(out_dir), resume, reshard, overrides or [], stop, tracking)
    finally:
        stop.restore()


def _run(
    config: RunConfig | dict | str | Path,
    out: Path,
    resume: bool,
    reshard: bool,
    overrides: list[str],
    stop: StopRequest,
    tracking: RunSettings | None = None,
) -> dict[str, Any]:
    cfg = _load(config, overrides)
    layout = detect()
    resume, reshard = elastic_resume(cfg, layout, resume, reshard)
    dims = ParallelDims.from_dist(layout.world_size, cfg.dist)
    backend_name = choose_backend(
        cfg.dist.backend, layout, model=cfg.model.name, options=cfg.model.options, dims=dims
    )
    plan = resolve_batch(cfg, dims)
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
            job = build_job(
                cfg,
                layout,
                plan,
                backend,
                raw_model,
                data,
                device,
                threads,
                out,
                resume,
                reshard=reshard,
            )
            result = Trainer(job, stop, watchdog, tracking).fit()
        except Preempted:  # every rank agreed to stop: leave together
            backend.barrier()
            backend.shutdown()
            raise
        backend.shutdown()  # not after other errors: a dead peer could make it block
    finally:
        watchdog.stop()  # never outlive run(): an API caller's process must not be killed later
    return result


def elastic_resume(
    cfg: RunConfig, layout: Layout, resume: bool, reshard: bool
) -> tuple[bool, bool]:
    """(resume, reshard) of this start. With ``dist.elastic`` the config is the consent to
    continue at another world size (what ``--reshard`` says for a plain resume), and a
    restart by torchrun's elastic agent resumes by itself: the agent reruns the same
    command line, which a first start gave without ``--resume``."""
    if cfg.dist.elastic is None:
        return resume, reshard
    check_elastic(cfg, layout.local_world_size)
    if layout.restart_count > 0:
        if layout.is_main and not resume:
            print(
                f"scalelab train: elastic restart {layout.restart_count} at world size "
                f"{layout.world_size}: resuming from the newest checkpoint",
                flush=True,
            )
        resume = True
    return resume, reshard or resume


def _load(config: RunConfig | dict | str | Path, overrides: list[str]) -> RunConfig:
    if isinstance(config, RunConfig):
        return load_from_config(config, overrides)
    if isinstance(config, dict):
        return load_from_config(from_dict(config), overrides)
    return load(config, overrides)


def load_from_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` overrides to an existing config."""

    return from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """One rank's run: its state, and the metric reductions, checkpoints and energy
    readings it asks at the marks of the loop."""

    def __init__(
        self,
        job: Job,
        stop: StopRequest,
        watchdog: Watchdog,
        tracking: RunSettings | None = None,
    ) -> None:
        self.job, self.stop, self.watchdog = job, stop, watchdog
        self.tracking = tracking
        self.state = TrainState()
        self.reducer = MetricsReducer(job.backend, job.device, job.metrics, job.plan.global_batch)
        self.checkpointer = Checkpointer(job.run_dir.checkpoints, job, self.state, watchdog.beat)
        self.process_steps = 0  # steps run by this process (warm-up exclusion restarts on resume)
        self.bar: Any = _NoBar()
        self.clock = StepClock()
        self.energy = EnergyLedger(
            job.cfg.metrics.energy, job.backend, job.device, job.layout.local_rank
        )
        self.tracker = RunTracker(job.run_dir, None)  # opened by fit, once RUN_DIR is ready

    def fit(self) -> dict[str, Any]:
        """Resume if asked, run the remaining epochs, write model.pt and summary.json."""
        job = self.job
        describe_run_dir(job, run_info(job))
        if job.main and self.tracking is not None:  # `scalelab train --tracking`
            job.run_dir.set_tracking(self.tracking.model_dump(mode="json"))
        # Rank 0's trackers (MLflow, TensorBoard), from the settings in RUN_DIR (a study's
        # launch or --tracking wrote them); they never raise, nor wait on the network in a step.
        self.tracker = RunTracker.open(job.run_dir, job.main)
        self.tracker.start(job.cfg.to_dict())
        try:
            return self._fit()
        finally:
            self.tracker.close()  # bounded: tracking.mlflow.flush_s at most

    def _fit(self) -> dict[str, Any]:
        job = self.job
        job.metrics.write(
            {
                "kind": "start",
                "world_size": job.layout.world_size,
                "backend": job.backend.name,
                "launcher": job.layout.launcher,
                "hostnames": job.hostnames,
                "resume": job.resume,
                "restart_count": job.layout.restart_count,
            }
        )
        seed_everything(job.cfg.seed + 1 + job.layout.rank)  # per-rank streams (dropout)
        if job.resume:
            self.checkpointer.resume()
        self.join()
        job.model.train()
        for epoch in range(self.state.epoch, job.cfg.train.epochs):
            self.state.stats.comm_measured = job.backend.measures_comm
            self.run_epoch(epoch)
            self.end_epoch(epoch)
        return self.finish()

    def join(self) -> None:
        """Record this start's world size in the run's membership (kept in checkpoints);
        a change (an elastic restart on fewer or more nodes, or a resharded resume) is a
        ``membership`` record in metrics.jsonl."""
        layout, st = self.job.layout, self.state
        was = st.world_sizes[-1] if st.membership else None
        entry = st.join(layout.world_size, layout.restart_count)
        if entry is not None and was is not None:
            self.job.metrics.write({"kind": "membership", "world_size_was": was, **entry})
            if self.job.main:
                print(
                    f"scalelab train: world size {was} -> {layout.world_size} at step "
                    f"{entry['global_step']} (restart {layout.restart_count})",
                    flush=True,
                )

    def run_epoch(self, epoch: int) -> None:
        job, plan = self.job, self.job.plan
        first = self.state.step_in_epoch
        order = epoch_order(job.cfg.seed, epoch, len(job.train_set))
        batches = Batches(
            job.train_set,
            rank_batches(
                order,
                first,
                job.steps_per_epoch,
                plan.global_batch,
                job.backend.dp_rank,
                plan.per_rank_batch,
            ),
            job.device,
            job.channels_last,
            job.prefetch,
        )
        self.bar = _progress(
            self._show_bar(), epoch, job.cfg.train.epochs, first, job.steps_per_epoch
        )
        self.clock = StepClock()
        self.energy.mark()
        for step in range(first, job.steps_per_epoch):
            job.timer.mark("start")
            t0 = time.perf_counter()
            x, y = next(batches)
            t_data = time.perf_counter() - t0
            job.timer.mark("ready")
            t_comm = self.train_step(x, y)
            self.after_step(step, t_data, t_comm)
        self.bar.close()
        self.energy.mark(samples=(job.steps_per_epoch - first) * plan.global_batch)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Forward/backward over the micro-batches (gradients averaged on the last), update.
        Returns the seconds the backend waited for gradient communication, if it knows."""
        job = self.job
        with job.backend.activation_meter():
            if job.backend.pipeline is not None:
                self.pipeline_step(x, y)
            else:
                self.accumulate(x, y)
        job.timer.mark("backward")
        t_comm = job.backend.step(job.optimizer, job.params, job.cfg.optim.grad_clip)
        job.optimizer.zero_grad()  # set_to_none (the default) frees grads early
        job.scheduler.step()
        return t_comm

    def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward and backward of each micro-batch; gradients averaged on the last."""
        job, plan = self.job, self.job.plan
        mb = plan.micro_batch
        for micro in range(plan.accum_steps):
            xs, ys = x[micro * mb : (micro + 1) * mb], y[micro * mb : (micro + 1) * mb]
            last = micro == plan.accum_steps - 1
            with contextlib.nullcontext() if last else job.backend.no_sync(job.model):
                with job.autocast:
                    logits = job.model(xs)
                    loss = F.cross_entropy(logits, ys)
                (loss / plan.accum_steps).backward()
            self.reducer.add(loss, logits, ys)

    def pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The batch through the pipeline's schedule (its m micro-batches); the rank
        holding the last stage counts the loss."""
        with self.job.autocast:
            out = self.job.backend.pipeline.step(x, y)
        if out is not None:
            self.reducer.add(out[0], out[1], y)

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
            self.checkpointer.save()
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
        where = {
            "epoch": st.epoch,
            "step": st.step_in_epoch,
            "global_step": st.global_step,
            "lr": job.scheduler.get_last_lr()[0],
        }
        self.reducer.start(self.stop.requested, data_s, comm_s, where)
        if self.reducer.finish(st.stats, self.bar, keep=0 if drain else 1):
            self.preempt()

    def preempt(self) -> None:
        """Some rank was asked to stop: checkpoint here, record it, leave together."""
        job, st = self.job, self.state
        self.reducer.finish(st.stats, self.bar)
        st.stats.wall_s += self.clock.epoch()
        path = self.checkpointer.save()
        job.metrics.write(
            {
                "kind": "preempted",
                "signal": self.stop.name or "peer",
                "epoch": st.epoch,
                "step_in_epoch": st.step_in_epoch,
                "global_step": st.global_step,
                "checkpoint": path.name,
            }
        )
        job.metrics.close()
        # No rank leaves before the record is written: srun --kill-on-bad-exit ends the step
        # when the first rank exits 75.
        job.backend.barrier()
        self.bar.close()
        raise Preempted(
            f"stop signal {self.stop.name or '(on another rank)'}: checkpoint "
            f"{path} at epoch {st.epoch + 1} step {st.step_in_epoch}; "
            "rerun with --resume"
        )

    def end_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, move on, checkpoint when due."""
        job, st, cfg = self.job, self.state, self.job.cfg
        is_last = epoch == cfg.train.epochs - 1
        val = (None, None)
        if job.val_set is not None and ((epoch + 1) % cfg.train.val_every_epochs == 0 or is_last):
            val = evaluate(
                job.raw_model,
                job.val_set,
                job.backend,
                job.device,
                job.plan.per_rank_batch,
                job.channels_last,
                job.autocast,
                self.watchdog,
            )
        st.stats.wall_s += self.clock.epoch()
        record = epoch_record(st.stats, epoch, cfg.train.epochs, st.global_step, *val)
        record.update(self.energy.epoch_fields())
        st.history.append(record)
        job.metrics.write(record)
        job.metrics.sync()
        self.tracker.epoch(record)
        if job.main:
            print(format_epoch_line(record), flush=True)
        st.next_epoch()
        every = cfg.checkpoint.every_epochs
        if is_last or (every and (epoch + 1) % every == 0):
            self.checkpointer.save()

    def finish(self) -> dict[str, Any]:
        """Final weights, then the summary (its presence marks the run completed)."""
        job = self.job
        final_state = job.backend.full_state(job.raw_model, None)[0]  # all ranks (gathers)
        if job.main:
            job.run_dir.write_model(lambda fh: torch.save(final_state, fh))
        result = summary(job, self.state, self.energy.reasons)
        job.metrics.write(
            {
                "kind": "end",
                "global_step": self.state.global_step,
                "samples_per_s": result["samples_per_s"],
            }
        )
        job.metrics.close()
        if job.main:
            job.run_dir.write_summary(result)
            self.tracker.finish(result)
        job.backend.barrier()
        return result

    def _show_bar(self) -> bool:
        progress = self.job.cfg.train.progress
        return self.job.main and (progress if progress is not None else sys.stderr.isatty())


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(show: bool, epoch: int, epochs: int, first: int, total: int):
    if not show:
        return _NoBar()

    return Progress(f"epoch {epoch + 1}/{epochs}", total, "steps", initial=first).__enter__()
