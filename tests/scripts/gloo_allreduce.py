"""torch.distributed gloo allreduce; rank layout and rendezvous from scalelab.layout."""

import json
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from scalelab.layout import detect

layout = detect()
dist.init_process_group(
    "gloo",
    init_method=f"tcp://{layout.master_addr}:{layout.master_port}",
    rank=layout.rank,
    world_size=layout.world_size,
    timeout=timedelta(seconds=60),
)
t = torch.tensor([float(layout.rank + 1)])
dist.all_reduce(t)
print(
    json.dumps(
        {
            "rank": layout.rank,
            "size": layout.world_size,
            "host": socket.gethostname(),
            "sum": t.item(),
            "master_addr": layout.master_addr,
        }
    ),
    flush=True,
)
dist.destroy_process_group()
