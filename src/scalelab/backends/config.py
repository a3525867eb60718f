"""The ``dist`` section of the run config: how ranks talk, and each backend's own options.

It lives with the backends (not the trainer) because a backend is what reads it: a
new backend adds its options section here and a field of that name to
:class:`DistConfig`. The trainer's config (:mod:`scalelab.train.config`) embeds it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from scalelab.backends.pipeline_rules import SCHEDULES
from scalelab.backends.registry import AUTO, CHOICES
from scalelab.config_types import Megabytes, NonNegFloat, NonNegInt, PosInt, Seconds, Section

#: ``dist.backend``'s values: ``auto`` and every registered backend.
BackendName = Literal[CHOICES]
#: ``dist.schedule``'s values: the pipeline schedules by name.
ScheduleName = Literal[tuple(SCHEDULES)]


class HorovodConfig(Section):
    """Horovod-only knobs."""

    compression: Literal["none", "fp16", "bf16"] = "none"
    """Gradient compression in the allreduce."""
    fusion_threshold_mb: NonNegFloat | None = None
    """Tensor fusion buffer (HOROVOD_FUSION_THRESHOLD); null: Horovod's default (128 MB)."""


class FSDPConfig(Section):
    """fsdp-only knobs (FSDP2 ``fully_shard`` per block, then the root)."""

    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Parameters and compute in bf16, gradient reduction in fp32; auto: bf16 on GPUs."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~1/3 more compute); the
    same as dist.activation_checkpointing."""
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3); false keeps them to backward (ZeRO-2)."""


#: Most nodes an elastic range may name: beyond this a typo, not a job.
MAX_ELASTIC_NODES = 1 << 16


class ElasticConfig(Section):
    """torchrun's elastic agent: the job survives losing (or gaining) nodes between
    ``min_nodes`` and ``max_nodes``; every membership change restarts all workers, which
    resume from the newest checkpoint at the new world size (resharded: this section is
    the consent ``--reshard`` gives a plain resume)."""

    min_nodes: PosInt = 1
    """Fewest nodes the job runs on; below this the agents wait, then fail."""
    max_nodes: Annotated[int, Field(ge=1, le=MAX_ELASTIC_NODES)] = 1
    """Most nodes the job runs on (the allocation's nodes under Slurm)."""
    max_restarts: Annotated[NonNegInt, Field(le=1000)] = 3
    """Worker-group restarts torchrun allows (each membership change or failure is one)."""

    @model_validator(mode="after")
    def _range(self) -> ElasticConfig:
        """An empty range can never rendezvous: refuse it here, not after a wait in the job."""
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"@min_nodes:{self.min_nodes} is more than max_nodes={self.max_nodes}")
        return self


class DistConfig(Section):
    """How ranks talk to each other."""

    backend: BackendName = AUTO
    """auto: horovod under horovodrun, ddp for several ranks, none for one; fsdp: sharded
    parameters, gradients and optimizer state (FSDP2)."""
    tp: PosInt = 1
    """Tensor-parallel ranks per model replica (gpt only; ddp or fsdp over world_size / tp
    data-parallel groups on a 2-D device mesh, or / (tp * pp) on the 3-D one)."""
    pp: PosInt = 1
    """Pipeline stages (gpt only): the blocks split by layer over pp ranks, the embedding on
    the first stage, the head and loss on the last; dp = world_size / (tp * pp)."""
    microbatches: PosInt | None = None
    """Micro-batches each pipeline step splits its batch into (m); null: pp. The bubble is
    (pp - 1) / (virtual_stages * m)."""
    schedule: ScheduleName = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining): gpipe, 1f1b, interleaved-1f1b
    (virtual_stages per rank), interleaved-zero-bubble, zbv-zero-bubble (2 per rank)."""
    virtual_stages: PosInt = 1
    """Pipeline stages each rank holds (v; the interleaved schedules take v >= 1)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (Megatron's full recomputation):
    activation memory per block falls to its input, for about one more forward."""
    timeout_s: Seconds = 300.0
    """A collective that waits longer than this fails the job (dead or stuck peer)."""
    socket_ifname: str | None = None
    """Network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME)."""
    bucket_cap_mb: Megabytes = 25.0
    """ddp: gradient bucket size."""
    horovod: HorovodConfig = Field(default_factory=HorovodConfig)
    """Horovod options."""
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    """fsdp options."""
    elastic: ElasticConfig | None = None
    """Elastic training under torchrun (min_nodes, max_nodes, max_restarts); null: a lost
    node fails the job (a retry resumes it). Needs optim.global_batch_size (strong
    scaling: the global batch, and so the loss curve, stay the same at every world size)."""

    @property
    def m(self) -> int:
        """The micro-batch count m the pipeline runs (``microbatches``, or pp)."""
        return self.microbatches if self.microbatches is not None else self.pp
