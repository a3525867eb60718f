"""The batch rule: the global, per-rank and micro-batch sizes and the scaled learning rate
once the layout is known, and the elastic world sizes it must hold for.

One rule for the trainer and the plan (:mod:`scalelab.study.plan`), so a point the plan
accepts is a point the trainer runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scalelab.backends.parallel_dims import ParallelDims
from scalelab.errors import UsageError
from scalelab.train.config import RunConfig


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes and learning rate once the world size is known."""

    global_batch: int
    per_rank_batch: int
    micro_batch: int
    accum_steps: int
    lr: float


def _check_pipeline_batch(par: ParallelDims, accum: int, batch: int | None, prefix: str) -> None:
    """A replica's batch under a pipeline: the layout's rule (``ParallelDims.batch_problems``),
    checked before the batch divides (accumulation) and after (micro-batches)."""
    found = par.batch_problems(accum, batch)
    if found:
        raise UsageError(found[0].line(prefix))


def resolve_batch(cfg: RunConfig, world_size: int | ParallelDims, prefix: str = "") -> BatchPlan:
    """Derive per-rank and micro-batch sizes and the scaled lr; check divisibility. The
    batch splits over the layout's data-parallel replicas (a world size alone: all ranks)."""
    par = world_size if isinstance(world_size, ParallelDims) else ParallelDims.of(world_size)
    dp = par.replicas
    o = cfg.optim
    accum = o.grad_accum_steps
    _check_pipeline_batch(par, accum, None, prefix)
    if o.per_rank_batch_size is not None:
        if o.per_rank_batch_size % accum:
            raise UsageError(
                f"field '{prefix}optim.per_rank_batch_size': {o.per_rank_batch_size} is not "
                f"divisible by optim.grad_accum_steps={accum}"
            )
        global_batch = o.per_rank_batch_size * dp
    else:
        global_batch = o.global_batch_size if o.global_batch_size is not None else 256
        if global_batch % (dp * accum):
            raise UsageError(
                f"field '{prefix}optim.global_batch_size': {global_batch} is not divisible by "
                f"{par.replicas_words()} * grad_accum_steps = {dp} * {accum}"
            )
    per_rank = global_batch // dp
    _check_pipeline_batch(par, accum, per_rank, prefix)
    lr = o.lr * global_batch / o.base_batch_size if o.base_batch_size else o.lr
    if not math.isfinite(lr):
        raise UsageError(f"field '{prefix}optim.lr': the scaled learning rate is not finite")
    return BatchPlan(global_batch, per_rank, per_rank // accum, accum, lr)


def elastic_world_sizes(cfg: RunConfig, tasks_per_node: int) -> list[int]:
    """The world sizes an elastic run may have: every node count of ``dist.elastic`` times
    the ranks per node ([] without ``dist.elastic``)."""
    el = cfg.dist.elastic
    if el is None:
        return []
    return [n * tasks_per_node for n in range(el.min_nodes, el.max_nodes + 1)]


def check_elastic(cfg: RunConfig, tasks_per_node: int, prefix: str = "") -> None:
    """Refuse an elastic range where some allowed world size cannot hold the layout or
    split the global batch: found at plan (or start) time, not after a node is lost."""
    for world in elastic_world_sizes(cfg, tasks_per_node):
        nodes = world // tasks_per_node
        dims = ParallelDims.from_dist(world, cfg.dist)
        where = f"field '{prefix}dist.elastic': at {nodes} node(s) x {tasks_per_node} ranks"
        if not dims.fits:
            raise UsageError(
                f"{where}: world size {world} is not a multiple of tp * pp = {dims.tp} * {dims.pp}"
            )
        try:
            resolve_batch(cfg, dims, prefix)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
