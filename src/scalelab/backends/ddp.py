"""PyTorch DistributedDataParallel over torch.distributed (NCCL on GPU, gloo on CPU).

Gradients are averaged in buckets during ``backward`` (overlapping
communication with compute), so ``step`` only applies the update and the
communication time is not separable from backward (``measures_comm`` False).
``dist.timeout_s`` bounds process-group creation and every collective: a dead
peer fails the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalelab.backends import Backend
from scalelab.errors import UsageError


class DDPBackend(Backend):
    """torch.distributed + DistributedDataParallel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ddp: DistributedDataParallel | None = None

    def setup(self) -> None:
        if self.cfg.socket_ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = self.cfg.socket_ifname
            os.environ["NCCL_SOCKET_IFNAME"] = self.cfg.socket_ifname
        # env:// also covers torchrun, whose agent already hosts the store on MASTER_PORT.
        os.environ["MASTER_ADDR"] = self.layout.master_addr
        os.environ["MASTER_PORT"] = str(self.layout.master_port)
        kwargs: dict[str, Any] = {}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            kwargs["device_id"] = self.device
        dist.init_process_group(
            backend="nccl" if self.device.type == "cuda" else "gloo",
            init_method="env://",
            rank=self.layout.rank,
            world_size=self.layout.world_size,
            timeout=timedelta(seconds=self.cfg.timeout_s),
            **kwargs,
        )

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if sync_batchnorm:
            if self.device.type != "cuda":
                raise UsageError("field 'model.sync_batchnorm': torch's SyncBatchNorm needs CUDA")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, accum_steps: int
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            gradient_as_bucket_view=False,
        )
        return self._ddp, optimizer

    def sync_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Every rank loaded the same checkpoint file; rank 0's copy is authoritative.
        module = self._ddp.module if self._ddp is not None else model
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        assert self._ddp is not None, "wrap() first"
        return self._ddp.no_sync()

    def allreduce(self, values: list[float], op: Literal["sum", "mean"] = "sum") -> list[float]:
        comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= self.world_size
        return t.tolist()

    def allreduce_async(self, tensor: torch.Tensor) -> Callable[[], list[float]]:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

        def result() -> list[float]:
            work.wait()
            return tensor.tolist()

        return result

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        # Free DDP's reducer while the process-group registry still holds the group:
        # if the reducer's reference were the last one, ~ProcessGroupGloo would run in
        # its dealloc with the GIL held and join a gloo thread that waits for the GIL
        # (a hang seen here at the end of 2-rank runs).
        self._ddp = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
