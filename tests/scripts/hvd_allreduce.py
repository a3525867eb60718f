"""Horovod allreduce over all ranks; prints one JSON line per rank."""

import json
import socket

import horovod.torch as hvd
import torch

hvd.init()
t = torch.tensor([float(hvd.rank() + 1)])
total = hvd.allreduce(t, op=hvd.Sum).item()
print(
    json.dumps(
        {
            "rank": hvd.rank(),
            "size": hvd.size(),
            "host": socket.gethostname(),
            "sum": total,
            "mpi": hvd.mpi_enabled(),
            "gloo": hvd.gloo_enabled(),
        }
    ),
    flush=True,
)
hvd.shutdown()
