"""Synthetic images for throughput runs, in the spirit of Horovod's synthetic benchmark.

Nothing is stored per sample: sample ``i`` is computed from ``(seed, i)`` when
asked for, so a "1.28 million image" epoch costs a few MB. Each image is one of
a small pool of seeded noise images plus a per-class template, so the labels
are learnable and loss/accuracy curves mean something, while the cost per batch
stays a gather and an add (no per-sample random generation).
"""

from __future__ import annotations

import numpy as np

#: The noise pool holds at most this many bytes (it bounds memory for large images).
POOL_BYTES = 32 * 2**20


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """A splitmix64-style integer hash: index -> well spread uint64."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SyntheticDataset:
    """``num_samples`` seeded images of ``image_shape`` in ``num_classes`` classes.

    ``signal`` scales the class template against unit noise: 0 gives pure
    noise (unlearnable, like Horovod's benchmark), larger is easier.
    ``first_index`` shifts the sample ids: a validation split is the same
    generator (same class templates) at ids the training split does not use.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        image_shape: tuple[int, int, int],
        seed: int = 0,
        signal: float = 0.5,
        first_index: int = 0,
    ) -> None:
        if num_samples < 1 or num_classes < 1:
            raise ValueError("num_samples and num_classes must be >= 1")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.seed = int(seed)
        self.first_index = int(first_index)
        rng = np.random.default_rng(self.seed)
        image_bytes = 4 * int(np.prod(self.image_shape))
        pool_size = int(max(1, min(64, POOL_BYTES // image_bytes)))
        self._pool = rng.standard_normal((pool_size, *self.image_shape), dtype=np.float32)
        self._templates = signal * rng.standard_normal(
            (self.num_classes, *self.image_shape), dtype=np.float32
        )

    def __len__(self) -> int:
        return self.num_samples

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        """Labels of ``indices`` (int64), without building the images."""
        ids = np.asarray(indices) + self.first_index
        return (_mix(ids, self.seed) % np.uint64(self.num_classes)).astype(np.int64)

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32, N C H W) and labels (int64) of ``indices``."""
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"index out of range [0, {self.num_samples})")
        labels = self.labels_of(indices)
        noise = _mix(indices + self.first_index, self.seed + 1) % np.uint64(len(self._pool))
        images = self._pool[noise.astype(np.int64)]
        images += self._templates[labels]
        return images, labels


class ClassPatterns:
    """Images for the staged ``synthetic`` source: learnable, but not at once.

    Each class has a smooth pattern (random values on ``block`` x ``block`` pixel
    tiles, so a CNN's early layers pick it up). Image ``i`` shows its class's pattern
    at one of ``levels`` strengths up to ``amplitude`` (of 255) over uniform noise
    filling the rest of the byte range, so faint images are hard and some are
    impossible; a ``confusion`` fraction shows another class's pattern than its label
    says (label noise), which caps accuracy below 1 the way real labels do. The
    default (amplitude 112, 16 levels, 10% confusion) gives a small CNN about 0.6-0.8
    validation accuracy after one epoch of the default config, still rising over
    the next epochs towards ~0.85, instead of 1.000 at once.

    Everything per image is a function of (seed, id): two gathers and an add, so
    generating stays much faster than writing the shards.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        seed: int,
        amplitude: int = 96,
        levels: int = 16,
        block: int = 4,
        confusion: float = 0.15,
    ) -> None:
        if not 0 < amplitude < 255 or levels < 1 or block < 1 or not 0 <= confusion < 1:
            raise ValueError(
                "need 0 < amplitude < 255, levels >= 1, block >= 1, 0 <= confusion < 1"
            )
        rng = np.random.default_rng([seed, 0x5CA1E])
        channels, height, width = image_shape
        self.num_classes, self.image_shape, self.seed = num_classes, tuple(image_shape), seed
        self.levels, self.confusion = levels, confusion
        tiles = rng.random((num_classes, channels, -(-height // block), -(-width // block)))
        smooth = np.kron(tiles, np.ones((1, 1, block, block)))[:, :, :height, :width]
        size = channels * height * width
        strengths = np.arange(1, levels + 1, dtype=np.float32)[:, None, None] / levels
        #: (levels, classes, pixels) uint8: pattern of class c at strength l
        self._patterns = (strengths * amplitude * smooth.reshape(1, num_classes, size)).astype(
            np.uint8
        )
        self._span = max(1 << 23, 4 * size)
        pool = rng.integers(0, 256 - amplitude, self._span + size, dtype=np.uint8)
        self._windows = np.lib.stride_tricks.sliding_window_view(pool, size)

    def images(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """uint8 images (N, C, H, W) of sample ``ids`` carrying ``labels``."""
        ids = np.asarray(ids, dtype=np.int64)
        h = _mix(ids, self.seed)
        level = (h % np.uint64(self.levels)).astype(np.int64)
        confused = ((h >> np.uint64(16)) % np.uint64(1 << 20)).astype(
            np.float64
        ) < self.confusion * (1 << 20)
        other = ((h >> np.uint64(40)) % np.uint64(self.num_classes)).astype(np.int64)
        shown = np.where(confused, other, np.asarray(labels, dtype=np.int64))
        offsets = (_mix(ids, self.seed + 1) % np.uint64(self._span)).astype(np.int64)
        out = self._patterns[level, shown] + self._windows[offsets]
        return out.reshape((len(ids), *self.image_shape))
