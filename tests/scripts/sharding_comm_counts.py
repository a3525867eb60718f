"""Rank program: count the collectives one training step issues (CommDebugMode).

MODE=tp: the tiny GPT split over 2 ranks; MODE=fsdp / fsdp-keep: fully_shard per block
and root, resharding after forward or not. Rank 0 prints one JSON line of counts.
"""

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

from scalelab.backends.fsdp import apply_tp, shard_model
from scalelab.models.gpt import gpt

dist.init_process_group("gloo")
mode = os.environ["MODE"]
torch.manual_seed(0)
model = gpt(32, (16,), size="tiny", n_layers=3)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
if mode == "tp":
    apply_tp(model, mesh)
else:
    shard_model(model, mesh, reshard=mode == "fsdp")  # as the fsdp backend wraps it
x = torch.randint(0, 32, (4, 16))
found = []
for _ in range(2):  # the second step: nothing lazy left
    debug = CommDebugMode()
    with debug:
        torch.nn.functional.cross_entropy(model(x), x).backward()
    found.append({str(k).split(".")[-1]: v for k, v in debug.get_comm_counts().items()})
if dist.get_rank() == 0:
    print(json.dumps(found[-1]))
dist.destroy_process_group()
