"""The held-out split evaluated during training: each rank its own share, one all-reduce.

Split from :mod:`scalelab.train.loop` (the trainer calls :func:`evaluate` at the end of each
epoch); ``scalelab evaluate`` of finished weights is :mod:`scalelab.evaluate`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from scalelab.backends import Backend
from scalelab.train.sampling import Batches, eval_shard
from scalelab.train.watchdog import Watchdog


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    backend: Backend,
    device: torch.device,
    batch: int,
    channels_last: bool,
    autocast,
    watchdog: Watchdog,
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole split; each rank evaluates its own share."""
    was_training = model.training
    model.eval()
    idx = eval_shard(len(dataset), backend.dp_rank, backend.dp_size)
    # As many chunks on every rank (shares differ by one sample): fsdp/tp forwards are
    # collectives, and a rank with one chunk more would wait for its peers forever.
    count = math.ceil(math.ceil(len(dataset) / backend.dp_size) / batch)
    chunks = (c for c in np.array_split(idx, max(1, count)) if len(c))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in Batches(dataset, chunks, device, channels_last, prefetch=False):
        with autocast:
            logits = model(x) if backend.pipeline is None else backend.pipeline.forward(x)
        watchdog.beat()
        if logits is None:  # a pipeline rank without the last stage
            continue
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum().double()
        sums[2] += y.numel()  # targets: labels, or tokens of sequences
    model.train(was_training)
    loss_sum, correct, count = backend.allreduce(sums.tolist())
    return loss_sum / count, correct / count
