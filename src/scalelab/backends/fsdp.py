"""Sharded data parallelism (FSDP2) and tensor parallelism on a 2-D device mesh.

The world is a ``dp x tp`` DeviceMesh (``init_device_mesh``; rank = dp_index * tp +
tp_index, so tensor-parallel peers are neighbours, on one node when tp divides the
ranks per node). Both classes join the job like ddp (torch.distributed, NCCL on
GPUs, gloo on CPUs) and are applied from outside the model and the loop:

- :class:`FSDPBackend` (``dist.backend: fsdp``): ``fully_shard`` on every block of
  the model (the elements of its top-level ModuleLists, torchtitan's per-block
  wrapping), then on the root, over the ``dp`` mesh dimension. Parameters,
  gradients and optimizer state are sharded; each block's parameters are
  all-gathered for its forward and backward and its gradients reduce-scattered.
  bf16 parameters with fp32 reduction on GPUs (``dist.fsdp.mixed_precision``),
  optional activation checkpointing per block.
- :class:`TPDataParallel` (``dist.backend: ddp`` with ``dist.tp > 1``): replicas are
  tensor-parallel models; gradients are averaged over the ``dp`` dimension in one
  flat all-reduce per step (DDP proper does not take DTensor parameters).

With ``dist.tp > 1`` the GPT blocks are first split with ``parallelize_module``
(Megatron-LM's column-then-row split of attention and MLP, see
:data:`scalelab.models.gpt.TP_PLAN`). Tensor-parallel peers read the same batch
(:attr:`dp_rank`). Checkpoints and ``model.pt`` hold the unsharded state
(``torch.distributed.checkpoint.state_dict``'s full state dicts), so they resume at
any world size and compare with DDP's byte for byte in layout.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelab.backends.ddp import DDPBackend
from scalelab.errors import UsageError

#: Models with a tensor-parallel plan.
TP_MODELS = ("gpt",)


def check_tp(backend: str, world_size: int, tp: int, model: str | None,
             options: dict[str, Any] | None = None) -> None:
    """Reject tensor-parallel layouts that cannot exist (before any process group; the
    workflow asks at plan time): the backend, the ranks, the model and its heads."""
    if backend in ("horovod", "none"):
        raise UsageError(f"field 'dist.tp': tensor parallelism (tp={tp}) needs the ddp or fsdp "
                         f"backend, not {backend}")
    if world_size % tp:
        raise UsageError(f"field 'dist.tp': tp={tp} needs a multiple of {tp} ranks; the "
                         f"launcher started {world_size}")
    if model is not None and model not in TP_MODELS:
        raise UsageError(f"field 'dist.tp': model {model!r} has no tensor-parallel plan "
                         f"(tp > 1 supports: {', '.join(TP_MODELS)})")
    from scalelab.models.gpt import gpt_heads

    heads = gpt_heads(options or {}) if model == "gpt" else None
    if heads is not None and heads % tp:
        raise UsageError(f"field 'dist.tp': the model's {heads} heads do not split over "
                         f"tp={tp} ranks")


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    """Split every GPT block's attention and MLP over ``tp_mesh`` (in place)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from scalelab.models.gpt import GPT, TP_PLAN

    if not isinstance(model, GPT):
        raise UsageError(f"field 'dist.tp': {type(model).__name__} has no tensor-parallel plan")
    tp = tp_mesh.size()
    if model.n_heads % tp:
        raise UsageError(f"field 'dist.tp': the model's {model.n_heads} heads do not split "
                         f"over tp={tp} ranks")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {name: styles[s]() for name, s in TP_PLAN.items()})


def blocks_of(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(list, index) of every element of the model's ModuleLists that are not inside another
    list: GPT's and ViT's blocks. Models without any (CNN, ResNet) shard at the root only."""
    found: list[tuple[nn.ModuleList, int]] = []
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            found.extend((module, i) for i in range(len(module)))
            inside.update(id(m) for m in module.modules())
    return found


def shard_model(model: nn.Module, mesh: Any, mp_policy: Any = None, reshard: bool = True,
                activation_checkpointing: bool = False) -> None:
    """``fully_shard`` every block, then the root (in place). The root keeps its gathered
    parameters after forward (backward needs them first), as torch's default does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    opts = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for parent, i in blocks_of(model):
        block = parent[i]
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                checkpoint_wrapper,
            )

            block = parent[i] = checkpoint_wrapper(block)
        fully_shard(block, reshard_after_forward=reshard, **opts)
    fully_shard(model, reshard_after_forward=False, **opts)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm over parameters that may live on different meshes
    (tensor-parallel 2-D, data-parallel 1-D, plain): one norm per tensor, reduced as its
    layout says (``full_tensor``), then combined here."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if not norms:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return total


class _MeshBackend(DDPBackend):
    """Joins like ddp, then lays the world out as a (dp, tp) DeviceMesh."""

    shards_state = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp = self.cfg.tp
        self.mesh: Any = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    def setup(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        check_tp(self.name, self.world_size, self.tp, None)
        super().setup()
        self.mesh = init_device_mesh(self.device.type, (self.dp_size, self.tp),
                                     mesh_dim_names=("dp", "tp"))

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             accum_steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer  # everything happened in prepare (before the optimizer)

    def memory_facts(self) -> dict[str, Any]:
        """The figures, and the layout they were measured under."""
        return {**super().memory_facts(), "dp": self.dp_size, "tp": self.tp}

    def sync_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: :meth:`load_full_state` gave every rank its shard of the same file."""

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Every rank takes part in the gathers; only global rank 0 receives the tensors.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=opts)
        optim_state = (get_optimizer_state_dict(model, optimizer, options=opts)
                       if optimizer is not None else None)
        return model_state, optim_state

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if any(not isinstance(key, str) for key in optim_state.get("state", {})):
            raise ValueError("the optimizer state is keyed by parameter index (a ddp/horovod "
                             "checkpoint), not by name")
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)

    def shutdown(self) -> None:
        self.mesh = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


class FSDPBackend(_MeshBackend):
    """FSDP2 over the ``dp`` mesh dimension (see the module docstring)."""

    name = "fsdp"

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        want = self.cfg.fsdp.mixed_precision
        if want == "bf16" or (want == "auto" and self.device.type == "cuda"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if sync_batchnorm:
            raise UsageError("field 'model.sync_batchnorm': not with the fsdp backend")
        if self.tp > 1:
            apply_tp(model, self.mesh["tp"])
        shard_model(model, self.mesh["dp"], self._mp_policy(),
                    self.cfg.fsdp.reshard_after_forward, self.cfg.fsdp.activation_checkpointing)
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return unsynced()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
             grad_clip: float | None) -> float | None:
        if grad_clip:
            clip_grad_norm(params, grad_clip)
        optimizer.step()
        self.measure_state(params, optimizer)
        return None


class TPDataParallel(_MeshBackend):
    """Tensor-parallel replicas, gradients averaged over ``dp`` once per step."""

    name = "ddp"

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if sync_batchnorm:
            raise UsageError("field 'model.sync_batchnorm': not with tensor parallelism")
        apply_tp(model, self.mesh["tp"])
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # gradients are only averaged in step()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
             grad_clip: float | None) -> float | None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if self.dp_size > 1:
            grads = [_local(p.grad) for p in params if p.grad is not None]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.mesh["dp"].get_group())
            flat /= self.dp_size
            for grad, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(avg)
        if grad_clip:
            clip_grad_norm(params, grad_clip)
        optimizer.step()
        self.measure_state(params, optimizer)
        return None
