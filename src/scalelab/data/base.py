"""The one interface between datasets and the trainer.

A dataset is an indexable collection of (image, label) pairs whose batches are
fetched by an array of indices. Fetching by index array (rather than one item
at a time) lets sharded, memory-mapped storage read contiguous runs cheaply and
keeps the trainer free of per-sample Python overhead.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ArrayDataset(Protocol):
    """What the trainer needs of a dataset split."""

    #: Number of classes; labels are ints in ``[0, num_classes)``.
    num_classes: int
    #: Shape of one image as (channels, height, width).
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` for ``indices`` in the order given.

        ``images`` is float32 of shape (len(indices), C, H, W), already
        normalized; ``labels`` is int64 of shape (len(indices),).
        """
        ...
