"""The bare baseline: a ~40-line DDP loop, the floor scalelab's overhead is measured against.

Same model and synthetic data as ``scalelab train`` (imported from scalelab),
no metrics, checkpoints or signals. Prints one JSON line on rank 0.
Usage (under torchrun or mpirun): bare_ddp.py STEPS WARMUP BATCH_PER_RANK
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from scalelab.data.synthetic import SyntheticDataset
from scalelab.models import build_model

steps, warmup, batch = (int(a) for a in sys.argv[1:4])
for ours, theirs in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")):
    os.environ.setdefault(ours, os.environ.get(theirs, "0"))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
data = SyntheticDataset(batch * world * (steps + warmup), 10, (3, 32, 32), seed=0)
model = DDP(build_model("cnn", 10, (3, 32, 32)))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
order = np.random.default_rng(0).permutation(len(data))
for step in range(warmup + steps):
    if step == warmup:
        dist.barrier()
        start = time.perf_counter()
    first = (step * world + rank) * batch
    x, y = (torch.from_numpy(a) for a in data.get_batch(order[first : first + batch]))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
dist.barrier()
elapsed = time.perf_counter() - start
if rank == 0:
    print(json.dumps({"samples_per_s": steps * batch * world / elapsed}), flush=True)
dist.destroy_process_group()
