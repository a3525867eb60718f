"""One small adapter per communication library, all with the same surface.

The benchmark loop must time the *library's* collective and nothing else, so
each adapter owns its buffers (torch tensors, numpy arrays) and exposes the
collectives as zero-argument callables built once per message size: no
allocation, conversion or dispatch on the timed path beyond what the library
itself does. Rank layout comes from the environment (:func:`scalelab.layout.detect`
for torch.distributed; mpi4py and Horovod read their own), so the same command
works under mpirun, srun (plain for gloo, ``--mpi=pmix`` for MPI/Horovod),
torchrun and horovodrun.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from scalelab.errors import UsageError
from scalelab.layout import detect

LIBS = ("torch", "horovod", "mpi4py")
#: Bytes per element; all benchmarks use float32, as nccl-tests' default.
ITEMSIZE = 4


class Comm(abc.ABC):
    """What the benchmark needs from a library (see the subclasses)."""

    lib = ""
    backend = ""
    rank = 0
    size = 1
    device = "cpu"

    @abc.abstractmethod
    def prepare(self, op: str, count: int) -> tuple[Callable[[], Any], Callable[[], int]]:
        """(run the collective once, verify the last result -> number of wrong elements).

        ``count`` is elements per rank (allgather: contributed by each rank).
        Verification refills the buffers with a known pattern and runs once more.
        """
        ...

    @abc.abstractmethod
    def reserve(self, max_count: int, gather_count: int) -> None:
        """Allocate the largest buffers once; every size uses a prefix of them.

        ``max_count``: elements of the input buffer; ``gather_count``: elements
        each rank contributes to the largest allgather (output: that x size).
        """
        ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def sync(self) -> None:  # noqa: B027 (a no-op by default, on purpose)
        """Wait for queued device work (a no-op on host buffers)."""

    @abc.abstractmethod
    def reduce(self, value: float, op: str) -> float:
        """``value`` summed (op='sum') or maximised (op='max') over ranks."""
        ...

    @abc.abstractmethod
    def gather(self, obj: Any) -> list[Any]:
        """A small Python object from every rank, to every rank."""
        ...

    def check(
        self,
        op: str,
        count: int,
        fill: Callable[[float], Any],
        run: Callable[[], Any],
        result: Callable[[], Any],
        to_numpy: Callable[[Any], Any],
    ) -> int:
        """Refill the input with the verification pattern, run once, count wrong elements.

        Pattern: rank r contributes r + 1 (allreduce, allgather); broadcast sends 42
        from rank 0 into zeros elsewhere.
        """
        if op == "broadcast":
            fill(42.0 if self.rank == 0 else 0.0)
        else:
            fill(float(self.rank + 1))
        run()
        self.sync()
        return _wrong(op, result(), count, self.size, to_numpy)

    def versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release the library's resources."""


# --------------------------------------------------------------------------- torch.distributed


class TorchComm(Comm):
    """torch.distributed: gloo on CPU, NCCL on GPU (``backend='auto'``)."""

    lib = "torch"

    def __init__(self, backend: str = "auto", timeout_s: float = 300.0) -> None:
        import torch
        import torch.distributed as dist

        layout = detect()
        cuda = torch.cuda.is_available()
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend not in ("gloo", "nccl", "mpi"):
            raise UsageError(f"--backend: {backend!r} is not gloo, nccl or mpi for --lib torch")
        if backend == "nccl" and not cuda:
            raise UsageError("--backend nccl: no CUDA device visible")
        self.torch, self.dist = torch, dist
        self.device = (
            f"cuda:{layout.local_rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
        )
        if self.device != "cpu":
            torch.cuda.set_device(self.device)
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(self.device)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{layout.master_addr}:{layout.master_port}",
            rank=layout.rank,
            world_size=layout.world_size,
            **kwargs,
        )
        self.backend = backend
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.launcher = layout.launcher

    def reserve(self, max_count: int, gather_count: int) -> None:
        t = self.torch
        self.buf = t.zeros(max_count, dtype=t.float32, device=self.device)
        self.out = t.zeros(gather_count * self.size, dtype=t.float32, device=self.device)

    def prepare(self, op: str, count: int):
        dist, buf, out = self.dist, self.buf[:count], self.out[: count * self.size]
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        run = {
            "allreduce": lambda: dist.all_reduce(buf),
            "allgather": lambda: gather(out, buf),
            "broadcast": lambda: dist.broadcast(buf, src=0),
        }[op]

        def verify() -> int:
            return self.check(
                op,
                count,
                buf.fill_,
                run,
                lambda: buf if op != "allgather" else out,
                lambda x: x.cpu().numpy(),
            )

        return run, verify

    def barrier(self) -> None:
        if self.backend == "nccl":
            self.dist.barrier(device_ids=[self.torch.cuda.current_device()])
        else:
            self.dist.barrier()

    def sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def reduce(self, value: float, op: str) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(
            t, op=self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX
        )
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def versions(self) -> dict[str, str]:
        v = {"torch": self.torch.__version__}
        if self.backend == "nccl":
            v["nccl"] = ".".join(map(str, self.torch.cuda.nccl.version()))
        return v

    def close(self) -> None:
        self.dist.destroy_process_group()


# --------------------------------------------------------------------------- Horovod


class HorovodComm(Comm):
    """Horovod's torch API; controller (MPI or Gloo) and CPU ops as Horovod was built."""

    lib = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd
        import torch

        hvd.init()
        self.hvd, self.torch = hvd, torch
        self.rank, self.size = hvd.rank(), hvd.size()
        gpu = torch.cuda.is_available() and hvd.nccl_built()
        self.device = f"cuda:{hvd.local_rank() % torch.cuda.device_count()}" if gpu else "cpu"
        if gpu:
            torch.cuda.set_device(self.device)
        controller = "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "?"
        self.backend = f"{controller}+{'nccl' if gpu else 'cpu'}"

    def reserve(self, max_count: int, gather_count: int) -> None:
        self.buf = self.torch.zeros(max_count, dtype=self.torch.float32, device=self.device)

    def prepare(self, op: str, count: int):
        hvd, buf = self.hvd, self.buf[:count]
        name = f"commbench.{op}.{count}"
        last: dict[str, Any] = {}

        def gather():
            last["out"] = hvd.allgather(buf, name=name)

        run = {
            "allreduce": lambda: hvd.allreduce_(buf, op=hvd.Sum, name=name),
            "allgather": gather,
            "broadcast": lambda: hvd.broadcast_(buf, root_rank=0, name=name),
        }[op]

        def verify() -> int:
            return self.check(
                op,
                count,
                buf.fill_,
                run,
                lambda: last["out"] if op == "allgather" else buf,
                lambda x: x.cpu().numpy(),
            )

        return run, verify

    def barrier(self) -> None:
        self.hvd.barrier()

    def sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def reduce(self, value: float, op: str) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64)
        return float(
            self.hvd.allreduce(
                t, op=self.hvd.Sum if op == "sum" else self.hvd.Max, name=f"commbench.reduce.{op}"
            ).item()
        )

    def gather(self, obj: Any) -> list[Any]:
        return list(self.hvd.allgather_object(obj, name="commbench.gather"))

    def versions(self) -> dict[str, str]:
        import horovod

        return {"horovod": horovod.__version__, "torch": self.torch.__version__}

    def close(self) -> None:
        self.hvd.shutdown()


# --------------------------------------------------------------------------- mpi4py


class MpiComm(Comm):
    """mpi4py buffer-interface collectives (upper-case methods) on numpy arrays."""

    lib = "mpi4py"

    def __init__(self) -> None:
        import numpy as np
        from mpi4py import MPI

        self.np, self.MPI, self.comm = np, MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.backend = "mpi"

    def reserve(self, max_count: int, gather_count: int) -> None:
        # zeros, written once: pages are mapped before timing starts
        self.buf = self.np.zeros(max_count, dtype=self.np.float32)
        self.out = self.np.zeros(gather_count * self.size, dtype=self.np.float32)
        self.buf.fill(0)
        self.out.fill(0)

    def prepare(self, op: str, count: int):
        MPI, comm = self.MPI, self.comm
        buf, out = self.buf[:count], self.out[: count * self.size]
        run = {
            "allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
            "allgather": lambda: comm.Allgather(buf, out),
            "broadcast": lambda: comm.Bcast(buf, root=0),
        }[op]

        def verify() -> int:
            return self.check(
                op, count, buf.fill, run, lambda: buf if op != "allgather" else out, lambda x: x
            )

        return run, verify

    def barrier(self) -> None:
        self.comm.Barrier()

    def reduce(self, value: float, op: str) -> float:
        return float(self.comm.allreduce(value, op=self.MPI.SUM if op == "sum" else self.MPI.MAX))

    def gather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def versions(self) -> dict[str, str]:
        import mpi4py

        return {
            "mpi4py": mpi4py.__version__,
            "mpi": self.MPI.Get_library_version().strip().splitlines()[0],
        }


def _wrong(op: str, result: Any, count: int, size: int, to_numpy: Callable[[Any], Any]) -> int:
    """Elements that differ from the value the verification pattern must produce."""
    import numpy as np

    arr = np.asarray(to_numpy(result))
    if op == "allreduce":
        expected = np.float32(size * (size + 1) / 2)
        return int(np.count_nonzero(arr[:count] != expected))
    if op == "broadcast":
        return int(np.count_nonzero(arr[:count] != np.float32(42.0)))
    expected = np.repeat(np.arange(1, size + 1, dtype=np.float32), count)
    return int(np.count_nonzero(arr[: count * size] != expected))


def open_comm(lib: str, backend: str = "auto", timeout_s: float = 300.0) -> Comm:
    """Initialise ``lib`` for this process (all ranks must call it)."""
    if lib == "torch":
        return TorchComm(backend, timeout_s)
    if backend not in ("auto", ""):
        raise UsageError(f"--backend: only for --lib torch (got {backend!r} with --lib {lib})")
    if lib == "horovod":
        return HorovodComm()
    if lib == "mpi4py":
        return MpiComm()
    raise UsageError(f"--lib: {lib!r} is not one of {', '.join(LIBS)}")


def hostname() -> str:
    return socket.gethostname()
