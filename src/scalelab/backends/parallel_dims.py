"""The parallel layout of a job: how the world splits into pp x dp x tp, its rules and its
device mesh, in one object (torchtitan's ``ParallelDims`` is the model).

Ranks are laid out ``rank = (pp_index * dp + dp_index) * tp + tp_index``: tensor-parallel
peers are neighbours (on one node when tp divides the ranks per node), pipeline stages
outermost. Batch resolution (:func:`scalelab.train.batch.resolve_batch`), the plan (every
sweep point), the backends, checkpoint resharding and the communication model all ask
this object, so the arithmetic and its error messages exist once.

Torch-free at import: the plan asks :meth:`ParallelDims.problems` for every sweep point
(only a GPT with tp > 1 imports the model module, for its head count). The pipeline's
own rules (schedule, virtual stages, micro-batches) are
:func:`scalelab.backends.pipeline_rules.pipeline_problems`, asked from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scalelab.backends.pipeline_rules import microbatch_problems, pipeline_problems
from scalelab.backends.problem import Problem
from scalelab.backends.registry import AUTO, REGISTRY, with_capability
from scalelab.errors import UsageError
from scalelab.models.gpt_shapes import gpt_heads, gpt_layers

__all__ = ["MESH_DIMS", "TP_MODELS", "ParallelDims", "Pipe", "Problem"]

#: Models with a tensor-parallel plan (:data:`scalelab.models.gpt_shapes.TP_PLAN`).
TP_MODELS = ("gpt",)
#: Mesh dimension names, outermost first (only the dimensions larger than one are
#: optional in torchtitan; here dp and tp are always present, as the backends index them).
MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Pipe:
    """How a pipeline runs: its schedule, the stages each rank holds (v), the
    micro-batches per step (m) and whether blocks recompute their activations."""

    schedule: str = "1f1b"
    v: int = 1
    m: int = 1
    recompute: bool = False


@dataclass(frozen=True)
class ParallelDims:
    """``world_size`` ranks as ``pp`` pipeline stages x ``dp`` data-parallel replicas x
    ``tp`` tensor-parallel ranks. Build it with :meth:`of`; :meth:`problems` says whether
    it can exist (a layout whose product is not the world size is representable, so the
    plan can report it instead of failing on it)."""

    world_size: int
    dp: int
    tp: int = 1
    pp: int = 1
    #: How the pipeline runs (only read when pp > 1).
    pipe: Pipe = field(default_factory=lambda: Pipe())

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims.{name} = {value!r}: must be an integer >= 1")

    @classmethod
    def of(
        cls, world_size: int, tp: int = 1, pp: int = 1, pipe: Pipe | None = None
    ) -> ParallelDims:
        """The layout of ``world_size`` ranks with ``tp`` tensor-parallel ranks per replica
        and ``pp`` stages; dp is what is left (at least 1: see :attr:`fits`)."""
        return cls(world_size, max(world_size // (tp * pp), 1), tp, pp, pipe or Pipe())

    @classmethod
    def from_dist(cls, world_size: int, dist: Any) -> ParallelDims:
        """The layout a run config's ``dist`` section asks of ``world_size`` ranks."""
        pipe = Pipe(dist.schedule, dist.virtual_stages, dist.m, dist.activation_checkpointing)
        return cls.of(world_size, dist.tp, dist.pp, pipe)

    # ----------------------------------------------------------------- arithmetic

    @property
    def fits(self) -> bool:
        """Whether dp x tp x pp is exactly the world size."""
        return self.dp * self.tp * self.pp == self.world_size

    @property
    def replicas(self) -> int:
        """How many shares each global batch splits into: the data-parallel degree
        (tensor-parallel peers and pipeline stages of one replica read the same samples)."""
        return self.dp

    def describe_pipe(self) -> str:
        """``pp 2, 1f1b, m 4`` (empty without a pipeline): what the bubble depends on."""
        if self.pp == 1:
            return ""
        v = f" x v {self.pipe.v}" if self.pipe.v > 1 else ""
        return f"pp {self.pp}{v}, {self.pipe.schedule}, m {self.pipe.m}"

    def replicas_words(self) -> str:
        """What the batch rule divides by, in words that name the real world size."""
        if self.tp == 1 and self.pp == 1:
            return "world_size"
        split = f"world size {self.world_size} / tp {self.tp}" + (
            f" / pp {self.pp}" if self.pp > 1 else ""
        )
        return f"data-parallel ranks ({split})"

    def coords(self, rank: int) -> dict[str, int]:
        """``rank``'s index along each mesh dimension."""
        return {
            "pp": rank // (self.dp * self.tp),
            "dp": (rank // self.tp) % self.dp,
            "tp": rank % self.tp,
        }

    def dp_rank(self, rank: int) -> int:
        """Which share of each global batch ``rank`` reads (tensor-parallel peers share one)."""
        return self.coords(rank)["dp"]

    def shape(self) -> tuple[int, ...]:
        """The mesh shape (dp, tp), with pp first once pipelines exist."""
        return (self.pp, self.dp, self.tp) if self.pp > 1 else (self.dp, self.tp)

    def names(self) -> tuple[str, ...]:
        """The mesh dimension names matching :meth:`shape`."""
        return MESH_DIMS if self.pp > 1 else MESH_DIMS[1:]

    def describe(self) -> str:
        """``8 ranks (dp 4 x tp 2)``."""
        parts = [f"{n} {getattr(self, n)}" for n in self.names()]
        return f"{self.world_size} ranks ({' x '.join(parts)})"

    # ----------------------------------------------------------------- rules

    def problems(
        self,
        backend: str = AUTO,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        planned: bool = False,
    ) -> list[Problem]:
        """Why this layout cannot run ``backend`` (a registered name or ``auto``) and
        ``model`` with ``options``; empty when it can. No process group and no torch
        (except a GPT with tp > 1, whose head count its module knows). ``planned``: the
        ranks are a planned sweep point's, not a started job's."""
        found: list[Problem] = []
        has = "this point has" if planned else "the launcher started"
        if self.pp > 1:
            layers = gpt_layers(options or {}) if model == "gpt" else None
            p = self.pipe
            found += pipeline_problems(self.pp, p.v, p.m, p.schedule, layers, backend, model)
            if found:
                return found
        sharded = with_capability("shards_state")
        if self.pipe.recompute and self.pp == 1 and backend not in sharded:
            found.append(
                Problem(
                    "dist.activation_checkpointing",
                    f"recomputation runs in pipeline stages (pp > 1) or under "
                    f"{' or '.join(sharded)}; backend {backend} at pp=1 does not recompute",
                )
            )
        tp_backends = with_capability("supports_tp")
        if self.tp > 1 and backend != AUTO and backend in REGISTRY and backend not in tp_backends:
            found.append(
                Problem(
                    "dist.tp",
                    f"tensor parallelism (tp={self.tp}) needs the "
                    f"{' or '.join(tp_backends)} backend, not {backend}",
                )
            )
            return found
        step = self.tp * self.pp
        if step > 1 and self.world_size % step:
            field = "dist.tp" if self.pp == 1 else "dist.pp"
            split = f"tp={self.tp}" if self.pp == 1 else f"tp x pp = {self.tp} x {self.pp}"
            found.append(
                Problem(field, f"{split} needs a multiple of {step} ranks; {has} {self.world_size}")
            )
            return found
        if self.tp == 1:
            return found
        if model is not None and model not in TP_MODELS:
            found.append(
                Problem(
                    "dist.tp",
                    f"model {model!r} has no tensor-parallel plan "
                    f"(tp > 1 supports: {', '.join(TP_MODELS)})",
                )
            )
            return found
        heads = None
        if model == "gpt":
            heads = gpt_heads(options or {})
        if heads is not None and heads % self.tp:
            found.append(
                Problem(
                    "dist.tp", f"the model's {heads} heads do not split over tp={self.tp} ranks"
                )
            )
        return found

    def batch_problems(self, accum: int = 1, batch: int | None = None) -> list[Problem]:
        """Why a replica's step of ``batch`` samples (None: not known yet), taken in
        ``accum`` gradient-accumulation steps, cannot feed this layout's pipeline; empty
        without a pipeline. The m micro-batches are the pipeline's own accumulation, so
        accumulating on top of them is refused rather than nested."""
        if self.pp == 1:
            return []
        if accum > 1:
            return [
                Problem(
                    "optim.grad_accum_steps",
                    f"{accum} accumulation steps with pipeline parallelism (pp={self.pp}): "
                    "the pipeline already accumulates over its micro-batches; set "
                    "dist.microbatches instead",
                )
            ]
        return [] if batch is None else microbatch_problems(self.pipe.m, batch)

    def check(
        self,
        backend: str = AUTO,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> None:
        """Raise a UsageError with the first of :meth:`problems` (before any process group)."""
        found = self.problems(backend, model, options)
        if found:
            raise UsageError(found[0].line(prefix))

    # ----------------------------------------------------------------- the mesh

    def build_mesh(self, device_type: str) -> Any:
        """The job's DeviceMesh (``init_device_mesh``) with dims named :meth:`names`;
        every rank calls it after the default process group exists."""
        self.check()
        if not self.fits:  # check() reports what a config can cause; this is a caller's bug
            raise ValueError(f"{self.describe()} is not the world size {self.world_size}")
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.shape(), mesh_dim_names=self.names())
