"""Tensor parallelism over data-parallel replicas (``dist.backend: ddp`` with ``dist.tp > 1``),
and the mesh that fsdp shares.

The world is the ``dp x tp`` DeviceMesh of the job's
:class:`~scalelab.backends.parallel_dims.ParallelDims` (rank = dp_index * tp + tp_index,
so tensor-parallel peers are neighbours, on one node when tp divides the ranks per
node). :class:`MeshBackend` joins the job like ddp (torch.distributed, NCCL on GPUs,
gloo on CPUs), then builds that mesh; :class:`TPDataParallel` and
:class:`scalelab.backends.fsdp.FSDPBackend` are its two kinds.

With ``dist.tp > 1`` the GPT blocks are split with ``parallelize_module``
(Megatron-LM's column-then-row split of attention and MLP, see
:data:`scalelab.models.gpt_shapes.TP_PLAN`); tensor-parallel peers read the same batch
(:attr:`MeshBackend.dp_rank`). :class:`TPDataParallel`'s replicas are tensor-parallel
models whose gradients are averaged over the ``dp`` dimension in one flat all-reduce per
step (DDP proper does not take DTensor parameters).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelab.backends.ddp import DDPBackend
from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.pipeline import LocalGPT, build_pipeline, split_for_rank
from scalelab.errors import UsageError
from scalelab.models.gpt import GPT
from scalelab.models.gpt_shapes import TP_PLAN


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    """Split every GPT block's attention and MLP over ``tp_mesh`` (in place); ``model`` is
    a GPT or the part of one a pipeline rank holds (:class:`~pipeline.LocalGPT`)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    if not isinstance(model, GPT | LocalGPT):
        raise UsageError(f"field 'dist.tp': {type(model).__name__} has no tensor-parallel plan")
    tp = tp_mesh.size()
    if model.n_heads % tp:
        raise UsageError(
            f"field 'dist.tp': the model's {model.n_heads} heads do not split over tp={tp} ranks"
        )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    for block in blocks:
        parallelize_module(block, tp_mesh, {name: styles[s]() for name, s in TP_PLAN.items()})


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group: Any = None) -> float:
    """Clip the global gradient norm over parameters that may live on different meshes
    (tensor-parallel 2-D, data-parallel 1-D, plain): one norm per tensor, reduced as its
    layout says (``full_tensor``), then combined here, and over the pipeline's stages
    (``pp_group``: each rank holds only its stages' parameters)."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    squares = torch.stack(norms).square().sum() if norms else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = float(squares.sqrt())
    if total == 0.0:
        return 0.0
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return total


class MeshBackend(DDPBackend):
    """Joins like ddp, then lays the world out as a (dp, tp) DeviceMesh."""

    shards_state = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp = self.cfg.tp
        self.mesh: Any = None

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims.from_dist(self.world_size, self.cfg)

    @property
    def pp_group(self) -> Any:
        """The process group of this rank's pipeline (None without one)."""
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    def split_pipeline(self, model: nn.Module, shard: Any = None) -> LocalGPT:
        """Keep this rank's stages of ``model``, split their blocks over tp, let ``shard``
        (fsdp) shard them, and build the schedule that runs them (:attr:`pipeline`)."""
        dims, pipe = self.dims, self.dims.pipe
        pp_rank = dims.coords(self.rank)["pp"]
        local, modules = split_for_rank(
            model, pp_rank, dims.pp, pipe.v, pipe.schedule, pipe.recompute
        )
        if self.tp > 1:
            apply_tp(local, self.mesh["tp"])
        if shard is not None:
            shard(local, modules)
        local.to(self.device)
        self.pipeline = build_pipeline(
            modules, pp_rank, dims.pp, pipe.v, pipe.m, pipe.schedule, self.device, self.pp_group
        )
        return local

    def setup(self) -> None:
        self.dims.check(self.name)
        super().setup()
        self.mesh = self.dims.build_mesh(self.device.type)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, accum_steps: int
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer  # everything happened in prepare (before the optimizer)

    def memory_facts(self) -> dict[str, Any]:
        """The figures, and the layout they were measured under; with a pipeline, every
        stage's figures too (stages differ: the embedding sits on the first, the head on
        the last)."""
        facts = {**super().memory_facts(), "dp": self.dp_size, "tp": self.tp}
        if self.pipeline is None:
            return facts
        mine = {**(self.state_bytes or {}), **self.activation_facts()}
        per_rank = self.gather_object(mine)
        stages = [per_rank[r] for r in self._stage_heads()]
        facts.update(pp=self.dims.pp, per_stage=stages)
        for key in ("state_bytes", "activation_peak_bytes"):
            values = [f.get(key) for f in per_rank if f.get(key) is not None]
            if values:
                facts[f"max_rank_{key}"] = max(values)
        return facts

    def _stage_heads(self) -> list[int]:
        """One rank per pipeline stage (dp and tp index 0), in stage order."""
        dims = self.dims
        return [
            r for r in range(self.world_size) if dims.coords(r)["dp"] == dims.coords(r)["tp"] == 0
        ]

    def sync_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: :meth:`load_full_state` gave every rank its shard of the same file."""

    def full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.pipeline is not None:
            return self._pipeline_full_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Every rank takes part in the gathers; only global rank 0 receives the tensors.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=opts)
        optim_state = (
            get_optimizer_state_dict(model, optimizer, options=opts)
            if optimizer is not None
            else None
        )
        return model_state, optim_state

    def _pipeline_full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[dict[str, Any], None]:
        """The whole GPT's weights on rank 0, from every stage's unsharded parts, in the
        GPT's own order (model.pt compares with a 1-process run's). Checkpoints of a
        pipeline are sharded (DCP), so the optimizer is never gathered here."""
        if optimizer is not None:
            raise ValueError("a pipeline's optimizer state is saved sharded, not gathered")
        part = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in model.state_dict().items()
        }
        coords = self.dims.coords(self.rank)
        mine = part if coords["dp"] == coords["tp"] == 0 else {}
        parts: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return {}, None
        merged = {k: v for p in parts for k, v in p.items()}
        return {k: merged[k] for k in sorted(merged, key=gpt_order)}, None

    def load_full_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optim_state: dict[str, Any],
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if any(not isinstance(key, str) for key in optim_state.get("state", {})):
            raise ValueError(
                "the optimizer state is keyed by parameter index (a ddp/horovod "
                "checkpoint), not by name"
            )
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)

    def shutdown(self) -> None:
        self.mesh = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


class TPDataParallel(MeshBackend):
    """Tensor-parallel or pipelined replicas, gradients averaged over ``dp`` once per step."""

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if sync_batchnorm:
            raise UsageError(
                "field 'model.sync_batchnorm': not with tensor or pipeline parallelism"
            )
        if self.dims.pp > 1:
            return self.split_pipeline(model)
        apply_tp(model, self.mesh["tp"])
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # gradients are only averaged in step()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None
    ) -> float | None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if self.dp_size > 1:
            grads = [_local(p.grad) for p in params if p.grad is not None]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.mesh["dp"].get_group())
            flat /= self.dp_size
            for grad, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(avg)
        if grad_clip:
            clip_grad_norm(params, grad_clip, self.pp_group)
        optimizer.step()
        self.measure_state(params, optimizer)
        return None


def gpt_order(name: str) -> tuple[int, int]:
    """Stable-sort key putting a GPT's parameter names in the model's own order:
    embeddings, blocks by index (each block's names keep their order), the final norm,
    the head."""
    head, _, rest = name.partition(".")
    if head == "blocks":
        return (3, int(rest.partition(".")[0]))
    return ({"tok": 0, "pos": 1, "drop": 2, "ln": 4}.get(head, 5), 0)
