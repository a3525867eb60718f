"""An in-memory dataset from numpy arrays (and ``.npz`` files holding them).

Used for small data sets and tests, and as the ``memory-npz`` data source of
the trainer: one ``.npz`` with ``<split>_images`` (N, C, H, W) and
``<split>_labels`` (N,) arrays, optionally ``num_classes``.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import BadInputData, DataError


class InMemoryDataset:
    """An :class:`~scalelab.data.base.ArrayDataset` over arrays held in memory.

    ``uint8`` images are scaled to [0, 1] per batch (so the stored copy stays
    four times smaller); float images are returned as they are.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None):
        if images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {images.shape}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise DataError(f"images must be uint8 or float, got {images.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got {labels.dtype}")
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"labels must lie in [0, {num_classes})")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in images.shape[1:])  # type: ignore[assignment]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32, N C H W) and labels (int64) at ``indices``."""
        images = self.images[indices]
        if images.dtype == np.uint8:
            images = images.astype(np.float32) * np.float32(1 / 255)
        else:
            images = images.astype(np.float32, copy=False)
        return images, self.labels[indices].astype(np.int64, copy=False)


@contextmanager
def open_npz(
    path: Path,
    missing: str,
    unreadable: Callable[[Exception], str],
    error: type[DataError] = DataError,
) -> Iterator[Any]:
    """An ``.npz`` archive opened without pickles. No file: BadInputData(``missing``); a
    file numpy cannot read (also while the body reads it): ``error(unreadable(exc))``."""
    if not path.is_file():
        raise BadInputData(missing)
    try:
        with np.load(path, allow_pickle=False) as archive:
            yield archive
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # EOFError: an empty file; BadZipFile/zlib.error: a truncated or garbled archive
        raise error(unreadable(exc)) from None


def load_npz(path: str | Path, split: str) -> InMemoryDataset:
    """Load split ``split`` from an ``.npz`` with ``<split>_images`` and ``<split>_labels``."""
    path = Path(path)
    with open_npz(
        path, f"no such file: {path}", lambda exc: f"{path}: cannot read: {exc}"
    ) as archive:
        keys = set(archive.files)
        want = (f"{split}_images", f"{split}_labels")
        missing = [k for k in want if k not in keys]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; has {sorted(keys)}")
        num_classes = int(archive["num_classes"]) if "num_classes" in keys else None
        return InMemoryDataset(archive[want[0]], archive[want[1]], num_classes)


def save_npz(
    path: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int
) -> None:
    """Write ``{split: (images, labels)}`` in the layout :func:`load_npz` reads."""
    arrays: dict[str, np.ndarray] = {"num_classes": np.asarray(num_classes)}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
