"""Horovod: DistributedOptimizer with tensor fusion and optional gradient compression.

Horovod starts its allreduces from gradient hooks during ``backward`` and
waits for them in ``optimizer.synchronize()``; ``step`` times that wait, the
communication the backward pass did not hide. Gradient accumulation uses
``backward_passes_per_step`` (hooks count the micro-batches), so ``no_sync``
is a no-op. Horovod initializes from MPI (mpirun, ``srun --mpi=pmix``) or
from horovodrun's gloo rendezvous. MPI collectives have no timeout, so the
trainer's watchdog (``dist.timeout_s``) bounds a wait on a dead peer.

On CPU runs the backend sets ``OMPI_MCA_mpi_yield_when_idle=1`` (unless
already set): Horovod's background thread polls MPI, and a busy-polling
thread steals a core from the compute threads (measured here: 2x slower on
2 cores without it). GPU runs keep Open MPI's default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from scalelab.backends import Backend
from scalelab.errors import UsageError


def _compression(kind: str):
    import horovod.torch as hvd

    if kind == "none":
        return hvd.Compression.none
    if kind == "fp16":
        return hvd.Compression.fp16

    class BF16Compressor(hvd.compression.Compressor):
        """Send floating-point gradients as bfloat16 (fp32 range, half the bytes)."""

        @staticmethod
        def compress(tensor: torch.Tensor):
            if tensor.dtype.is_floating_point:
                return tensor.to(torch.bfloat16), tensor.dtype
            return tensor, None

        @staticmethod
        def decompress(tensor: torch.Tensor, ctx):
            return tensor.to(ctx) if ctx is not None else tensor

    return BF16Compressor


class HorovodBackend(Backend):
    """horovod.torch."""

    measures_comm = True
    watchdog_grace_s = 0.0  # MPI collectives have no timeout: the watchdog is the only bound

    def setup(self) -> None:
        fusion = self.cfg.horovod.fusion_threshold_mb
        if fusion is not None:  # read by hvd.init(), so it must be set before
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion * 2**20))
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(self.cfg.timeout_s)))
        if self.cfg.socket_ifname:
            os.environ["HOROVOD_GLOO_IFACE"] = self.cfg.socket_ifname
            os.environ["NCCL_SOCKET_IFNAME"] = self.cfg.socket_ifname
        if self.device.type == "cpu":  # must precede MPI_Init
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        import horovod.torch as hvd

        self._check_compression()
        hvd.init()
        if hvd.size() != self.layout.world_size or hvd.rank() != self.layout.rank:
            raise UsageError(
                f"field 'dist.backend': horovod sees rank {hvd.rank()} of {hvd.size()} but the "
                f"{self.layout.launcher} launcher says rank {self.layout.rank} of "
                f"{self.layout.world_size}; under Slurm use 'srun --mpi=pmix'"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.hvd = hvd

    def _check_compression(self) -> None:
        """bf16 needs a Horovod build with bfloat16 allreduce (0.28.1 has none): fail early."""
        if self.cfg.horovod.compression != "bf16":
            return
        from horovod.torch import mpi_ops

        kind = "cuda_" if self.device.type == "cuda" else ""
        function = f"horovod_torch_allreduce_async_torch_{kind}BFloat16Tensor"
        if not hasattr(mpi_ops.mpi_lib, function):
            raise UsageError(
                "field 'dist.horovod.compression': this Horovod build has no bfloat16 "
                f"allreduce on {self.device.type}; use fp16 or none"
            )

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        if not sync_batchnorm:
            return model
        if self.device.type != "cuda":
            raise UsageError("field 'model.sync_batchnorm': needs CUDA")
        return _convert_sync_bn(model, self.hvd.SyncBatchNorm)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, accum_steps: int
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        hvd = self.hvd
        dist_opt = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=_compression(self.cfg.horovod.compression),
            backward_passes_per_step=accum_steps,
            op=hvd.Average,
        )
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimizer has no state to broadcast. Horovod would create it with a
        # zero-gradient step, which applies weight decay once and breaks equality with ddp.
        return model, dist_opt

    def sync_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None
    ) -> float | None:
        import time

        start = time.perf_counter()
        optimizer.synchronize()  # type: ignore[attr-defined]
        waited = time.perf_counter() - start
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            optimizer.step()
        self.measure_state(params, optimizer)
        return waited

    def allreduce(self, values: list[float], op: Literal["sum", "mean"] = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        out = self.hvd.allreduce(t, op=self.hvd.Sum, name="scalelab.metrics")
        if op == "mean":
            out /= self.world_size
        return out.tolist()

    def allreduce_async(self, tensor: torch.Tensor) -> Callable[[], list[float]]:
        # Two reductions may be in flight; Horovod matches them by name across ranks.
        self._metric_seq = getattr(self, "_metric_seq", 0) + 1
        handle = self.hvd.allreduce_async(
            tensor.cpu(), op=self.hvd.Sum, name=f"scalelab.metrics.{self._metric_seq % 2}"
        )
        return lambda: self.hvd.synchronize(handle).tolist()

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=root, name="scalelab.bcast")

    def gather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="scalelab.gather")

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self) -> None:
        self.hvd.shutdown()


def _convert_sync_bn(module: nn.Module, sync_cls) -> nn.Module:
    """Replace BatchNorm layers by Horovod's SyncBatchNorm, keeping their state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = sync_cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_sync_bn(child, sync_cls))
    return module
