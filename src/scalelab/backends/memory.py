"""Bytes of model state one rank holds, measured from its tensors (not computed).

Under sharding a parameter is a DTensor whose ``to_local()`` is this rank's
shard; gradients and optimizer state (Adam's moments, SGD's momentum) follow the
parameter's layout. Summing the local tensors' storage gives what the rank really
holds, so "FSDP halves the memory" is a measurement, with DDP measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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


class ActivationMeter:
    """The peak bytes of tensors autograd saves for backward during one step, measured
    with ``saved_tensors_hooks``: each saved tensor is counted when packed and uncounted
    when autograd frees it, so the peak is what the step really kept alive (a pipeline's
    in-flight micro-batches included; activation recomputation shows as a lower peak).
    A tensor saved twice counts twice: an upper bound by that much."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor) -> tuple[_Held, torch.Tensor]:
        return _Held(self, local_bytes(tensor)), tensor

    @staticmethod
    def _unpack(packed: tuple[_Held, torch.Tensor]) -> torch.Tensor:
        return packed[1]

    @contextlib.contextmanager
    def measure(self) -> Iterator[ActivationMeter]:
        """Count what autograd saves inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Held:
    """One saved tensor's bytes, returned to the meter when autograd drops it."""

    __slots__ = ("meter", "nbytes")

    def __init__(self, meter: ActivationMeter, nbytes: int) -> None:
        self.meter, self.nbytes = meter, nbytes
        meter.live += nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes
