"""Which samples each rank reads at each step, and fetching them.

The data order depends on (seed, epoch) only, never on the world size: step
``s`` of an epoch uses the global batch ``order[s*G:(s+1)*G]`` and rank ``r``
reads the contiguous slice ``[r*B:(r+1)*B]`` of it (B = G / world_size). So
one rank and N ranks see the same global batches (the equivalence proof), a
resumed run continues with the exact samples of the interrupted one (position
= step within the epoch), and a job may resume at another world size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The global permutation of sample indices for ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_batches(
    order: np.ndarray, first_step: int, steps: int, global_batch: int, rank: int, per_rank: int
) -> Iterator[np.ndarray]:
    """Index arrays of this rank for steps ``first_step .. steps-1``."""
    for step in range(first_step, steps):
        start = step * global_batch + rank * per_rank
        yield order[start : start + per_rank]


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, non-overlapping share of a validation split (all samples covered once)."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    return np.arange(lo, hi)


class Batches:
    """Turns index arrays into device tensors, optionally one batch ahead in a thread.

    The thread overlaps reading/decoding (numpy releases the GIL for copies)
    and the host-to-device copy from pinned memory with compute.
    """

    def __init__(
        self,
        dataset,
        index_batches: Iterator[np.ndarray],
        device: torch.device,
        channels_last: bool,
        prefetch: bool,
    ) -> None:
        self.dataset = dataset
        self.indices = index_batches
        self.device = device
        self.channels_last = channels_last
        self._queue: queue.Queue | None = None
        if prefetch:
            self._queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(
                target=self._fill, daemon=True, name="scalelab-prefetch"
            )
            self._thread.start()

    def _load(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.dataset.get_batch(idx)
        x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _fill(self) -> None:
        assert self._queue is not None
        try:
            for idx in self.indices:
                self._queue.put(self._load(idx))
        except BaseException as exc:  # hand the error to the consumer
            self._queue.put(exc)
            return
        self._queue.put(None)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._queue is None:
            return self._load(next(self.indices))
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
