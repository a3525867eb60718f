"""Parallelism applied to a model and optimizer from outside the training loop.

The loop is written once against :class:`Backend`; the backends differ only in how
gradients are averaged and how ranks talk (:mod:`scalelab.backends.registry` lists them,
with their capabilities; :class:`~scalelab.backends.parallel_dims.ParallelDims` is the
layout). Every
backend offers the same operations: ``setup``, ``prepare`` (before the
optimizer exists), ``wrap``, ``sync_state`` (after a checkpoint load),
``no_sync`` for accumulation, ``step``, metric ``allreduce``, object
broadcast/gather, ``barrier`` and ``shutdown``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.registry import (
    AUTO,
    BACKENDS,
    CHOICES,
    DEFAULT,
    MPI,
    REGISTRY,
    SINGLE,
    BackendSpec,
    load_class,
    name_of,
    resolve,
    spec,
    with_capability,
)
from scalelab.errors import UsageError

if TYPE_CHECKING:
    import torch

    from scalelab.backends.config import DistConfig
    from scalelab.layout import Layout

__all__ = [
    "AUTO",
    "BACKENDS",
    "CHOICES",
    "DEFAULT",
    "MPI",
    "REGISTRY",
    "SINGLE",
    "Backend",
    "BackendSpec",
    "ParallelDims",
    "choose_backend",
    "load_class",
    "make_backend",
    "name_of",
    "spec",
    "with_capability",
]


class Backend:
    """One rank's handle on the job; this base class is the single-process behaviour."""

    @property
    def name(self) -> str:
        """The backend's registered name (:func:`scalelab.backends.registry.name_of`)."""
        return name_of(type(self))

    def __init__(self, layout: Layout, cfg: DistConfig, device: torch.device) -> None:
        self.layout = layout
        self.cfg = cfg
        self.device = device

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    #: Whether ``step`` measures the time spent waiting for gradient communication.
    measures_comm = False
    #: Seconds the trainer's watchdog grants beyond ``dist.timeout_s`` before it ends a rank
    #: stuck in a collective: torch.distributed times out by itself, so the watchdog is the
    #: second line there; MPI collectives never time out, so for Horovod it is the first.
    watchdog_grace_s = 60.0

    @property
    def watchdog_limit_s(self) -> float:
        """Seconds without progress after which the watchdog ends this rank."""
        return self.cfg.timeout_s + self.watchdog_grace_s

    #: Whether each rank holds only a shard of the state: checkpoints are then written by
    #: every rank (torch.distributed.checkpoint), not gathered to rank 0.
    shards_state = False
    #: Parameter/gradient/optimizer-state bytes of this rank, measured at the first step.
    state_bytes: dict[str, int] | None = None
    #: Peak bytes autograd saved for backward in the first step (measured, see
    #: :meth:`activation_meter`); None until then.
    activation_peak_bytes: int | None = None
    #: The pipeline this rank runs (:class:`scalelab.backends.pipeline.Pipeline`) when
    #: ``dist.pp > 1``: the loop then steps through it instead of calling the model.
    pipeline: Any = None

    @property
    def dims(self) -> ParallelDims:
        """The job's parallel layout (data parallelism only, unless a subclass says more)."""
        return ParallelDims.of(self.world_size)

    @property
    def dp_rank(self) -> int:
        """Which share of each global batch this rank reads (tensor-parallel peers share one)."""
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        """Number of data-parallel shares of each global batch."""
        return self.dims.replicas

    def full_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Unsharded model and optimizer state dicts; every rank calls it (gathers when
        sharded), so checkpoints and model.pt do not depend on the world size."""
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None

    def load_full_state(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optim_state: dict[str, Any],
    ) -> None:
        """Inverse of :meth:`full_state` (each rank keeps its own shard)."""
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)

    def activation_meter(self) -> contextlib.AbstractContextManager:
        """Around the first step: measures what autograd keeps for backward into
        :attr:`activation_peak_bytes` (later steps run unhooked: the hooks cost time)."""
        if self.activation_peak_bytes is not None:
            return contextlib.nullcontext()
        from scalelab.backends.memory import ActivationMeter

        @contextlib.contextmanager
        def first_step():
            meter = ActivationMeter()
            with meter.measure():
                yield
            self.activation_peak_bytes = meter.peak

        return first_step()

    def activation_facts(self) -> dict[str, int]:
        """This rank's measured activation peak, when the first step has run."""
        if self.activation_peak_bytes is None:
            return {}
        return {"activation_peak_bytes": self.activation_peak_bytes}

    def memory_facts(self) -> dict[str, Any]:
        """Per-rank memory figures for the summary (measured, see scalelab.backends.memory)."""
        facts: dict[str, Any] = {f"rank0_{k}": v for k, v in (self.state_bytes or {}).items()}
        facts.update({f"rank0_{k}": v for k, v in self.activation_facts().items()})
        if self.device.type == "cuda":
            import torch

            facts["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return facts

    def setup(self) -> None:
        """Join the job (process group, MPI); bounded by ``dist.timeout_s`` where possible."""

    def prepare(self, model: torch.nn.Module, sync_batchnorm: bool) -> torch.nn.Module:
        """Model transformations that must precede optimizer creation (sync batch-norm)."""
        if sync_batchnorm:
            raise UsageError("field 'model.sync_batchnorm': needs the ddp or horovod backend")
        return model

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accum_steps: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Return the (model, optimizer) whose step averages gradients over ranks."""
        return model, optimizer

    def sync_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank hold rank 0's weights and optimizer state (after a resume)."""

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-batches whose gradients are not yet averaged."""
        return contextlib.nullcontext()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None
    ) -> float | None:
        """Average gradients (if not done during backward), clip, apply the update.

        Returns the seconds spent waiting for gradient communication when
        this backend can tell (``measures_comm``), else None.
        """
        if grad_clip:
            import torch

            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        self.measure_state(params, optimizer)
        return None

    def measure_state(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Record this rank's state bytes once, after the first step (optimizer state exists)."""
        if self.state_bytes is None:
            from scalelab.backends.memory import state_bytes

            self.state_bytes = state_bytes(params, optimizer)

    def allreduce(self, values: list[float], op: Literal["sum", "mean"] = "sum") -> list[float]:
        """Reduce a few metric scalars over ranks (float64)."""
        return list(values)

    def allreduce_async(self, tensor: torch.Tensor) -> Callable[[], list[float]]:
        """Start summing ``tensor`` (float64) over ranks; the returned call waits for the result.

        Lets the loop reduce step metrics and the stop flag while the next
        step computes, instead of adding a blocking collective to every step.
        """
        return tensor.tolist

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``obj`` on every rank (picklable objects)."""
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait for all ranks."""

    def shutdown(self) -> None:
        """Leave the job cleanly (only after success: a dead peer could make this hang)."""


def library_versions() -> dict[str, str | None]:
    """Versions of the communication libraries the backends use beyond torch (None: absent)."""
    try:
        import horovod

        return {"horovod": horovod.__version__}
    except ImportError:
        return {"horovod": None}


def choose_backend(
    requested: str,
    layout: Layout,
    tp: int = 1,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    *,
    dims: ParallelDims | None = None,
) -> str:
    """Resolve ``dist.backend: auto`` and reject combinations that cannot work (``dims``:
    the run's whole layout, else ``tp`` alone)."""
    (dims or ParallelDims.of(layout.world_size, tp)).check(requested, model, options)
    name = resolve(requested, layout.launcher, layout.world_size)
    if name in REGISTRY and REGISTRY[name].single_process and layout.world_size > 1:
        raise UsageError(
            f"field 'dist.backend': {name!r} runs one process but the {layout.launcher} "
            f"launcher started {layout.world_size}; use {DEFAULT} or {MPI}"
        )
    if (
        name in REGISTRY
        and REGISTRY[name].needs_mpi
        and layout.launcher in ("torchrun", "single")
        and layout.world_size > 1
    ):
        raise UsageError(
            f"field 'dist.backend': {name} needs an MPI launch (mpirun, srun --mpi=pmix) "
            f"or horovodrun, not {layout.launcher}"
        )
    spec(name)  # unknown: one line with the valid names
    return name


def make_backend(name: str, layout: Layout, cfg: DistConfig, device: torch.device) -> Backend:
    """Instantiate backend ``name`` (see :func:`choose_backend`) from the registry: the
    class for ``cfg.tp`` tensor-parallel ranks and ``cfg.pp`` stages (ddp's replicas are
    then tensor-parallel or pipelined)."""
    return load_class(name, cfg.tp, cfg.pp)(layout, cfg, device)
