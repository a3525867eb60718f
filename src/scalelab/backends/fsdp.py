"""Sharded data parallelism (FSDP2), optionally over tensor-parallel replicas.

:class:`FSDPBackend` (``dist.backend: fsdp``) is a
:class:`~scalelab.backends.tp.MeshBackend`: it joins like ddp and lays the world out as
the job's ``dp x tp`` mesh. It applies ``fully_shard`` on every block of the model (the
elements of its top-level ModuleLists, torchtitan's per-block wrapping), then on the
root, over the ``dp`` mesh dimension. Parameters, gradients and optimizer state are
sharded; each block's parameters are all-gathered for its forward and backward and its
gradients reduce-scattered. bf16 parameters with fp32 reduction on GPUs
(``dist.fsdp.mixed_precision``), optional activation checkpointing per block. With
``dist.tp > 1`` the GPT blocks are first split over the ``tp`` dimension
(:func:`scalelab.backends.tp.apply_tp`).

Checkpoints are sharded: every rank writes its shard (torch.distributed.checkpoint,
``ckpt-<step>.dcp``). ``model.pt`` holds the unsharded state
(``torch.distributed.checkpoint.state_dict``'s full state dict), so it compares with
DDP's byte for byte in layout.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from scalelab.backends.tp import MeshBackend, apply_tp, clip_grad_norm
from scalelab.errors import UsageError


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


def shard_model(
    model: nn.Module,
    mesh: Any,
    mp_policy: Any = None,
    reshard: bool = True,
    activation_checkpointing: bool = False,
) -> None:
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


class FSDPBackend(MeshBackend):
    """FSDP2 over the ``dp`` mesh dimension (see the module docstring)."""

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        want = self.cfg.fsdp.mixed_precision
        if want == "bf16" or (want == "auto" and self.device.type == "cuda"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if sync_batchnorm:
            raise UsageError("field 'model.sync_batchnorm': not with the fsdp backend")
        if self.dims.pp > 1:
            return self.split_pipeline(model, self._shard_stages)
        if self.tp > 1:
            apply_tp(model, self.mesh["tp"])
        shard_model(
            model,
            self.mesh["dp"],
            self._mp_policy(),
            self.cfg.fsdp.reshard_after_forward,
            self.cfg.fsdp.activation_checkpointing or self.cfg.activation_checkpointing,
        )
        return model

    def _shard_stages(self, local: nn.Module, stages: list[nn.Module]) -> None:
        """A pipeline rank's blocks, then each stage as a root (its embeddings or head),
        sharded over ``dp``: the stage is what the schedule calls, so its hooks gather."""
        from torch.distributed.fsdp import fully_shard

        opts = {"mesh": self.mesh["dp"], "mp_policy": self._mp_policy()}
        for block in local.blocks.values():
            fully_shard(block, reshard_after_forward=self.cfg.fsdp.reshard_after_forward, **opts)
        for stage in stages:
            fully_shard(stage, reshard_after_forward=False, **opts)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return unsynced()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None
    ) -> float | None:
        if grad_clip:
            clip_grad_norm(params, grad_clip, self.pp_group)
        optimizer.step()
        self.measure_state(params, optimizer)
        return None
