"""Bytes of model state one rank holds, measured from its tensors (not computed).

Under sharding a parameter is a DTensor whose ``to_local()`` is this rank's
shard; gradients and optimizer state (Adam's moments, SGD's momentum) follow the
parameter's layout. Summing the local tensors' storage gives what the rank really
holds, so "FSDP halves the memory" is a measurement, with DDP measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def local_bytes(tensor: Any) -> int:
    """Bytes of this rank's part of ``tensor`` (a DTensor's local shard, else the tensor)."""
    if tensor is None or not isinstance(tensor, torch.Tensor):
        return 0
    to_local = getattr(tensor, "to_local", None)
    if to_local is not None:
        tensor = to_local()
    return tensor.numel() * tensor.element_size()


def state_bytes(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes on this rank, and their total."""
    params = list(params)
    out = {
        "param_bytes": sum(local_bytes(p) for p in params),
        "grad_bytes": sum(local_bytes(p.grad) for p in params),
        "optim_state_bytes": sum(
            local_bytes(v) for state in optimizer.state.values() for v in state.values()
        ),
    }
    out["state_bytes"] = sum(out.values())
    return out
