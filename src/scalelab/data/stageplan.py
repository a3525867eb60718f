"""Plan a staging run before it writes: split, shard counts, source opening, size checks."""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scalelab.data import kinds
from scalelab.data.manifest import SPLITS
from scalelab.data.sources import (
    SOURCE_KINDS,
    ImageFolderSource,
    Source,
    SyntheticSource,
    digits_source,
    npz_source,
)
from scalelab.errors import UsageError

if TYPE_CHECKING:
    from scalelab.data.stage import StageConfig

#: shard size aimed at when --shards is not given
TARGET_SHARD_BYTES = 256 << 20


def parse_fractions(value: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """``--split TRAIN,VAL,TEST``: three fractions in [0, 1] that sum to 1, train > 0."""
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    parts = [p.strip() for p in text.split(",")]
    try:
        fracs = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--split {text}: expected three numbers TRAIN,VAL,TEST") from None
    if len(fracs) != 3:
        raise UsageError(f"--split {text}: expected 3 fractions TRAIN,VAL,TEST, got {len(fracs)}")
    if any(not 0.0 <= f <= 1.0 for f in fracs):
        raise UsageError(f"--split {text}: each fraction must be between 0 and 1")
    if abs(sum(fracs) - 1.0) > 1e-6:
        raise UsageError(f"--split {text}: fractions sum to {sum(fracs):g}, they must sum to 1")
    if fracs[0] <= 0:
        raise UsageError(f"--split {text}: the train fraction must be > 0")
    return fracs  # type: ignore[return-value]


def plan_split(
    labels: np.ndarray, num_classes: int, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Item ids of each split, stratified by class and shuffled by ``seed``.

    Per class with n items: val gets floor(n*f_val + 0.5), test gets
    floor(n*f_test + 0.5) (at most what is left), train the rest. Each split
    is then shuffled, so shards mix classes and can be read sequentially.
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(num_classes):
        ids = rng.permutation(order[bounds[c] : bounds[c + 1]])
        n = len(ids)
        n_val = min(n, math.floor(n * fractions[1] + 0.5))
        n_test = min(n - n_val, math.floor(n * fractions[2] + 0.5))
        n_train = n - n_val - n_test
        parts["train"].append(ids[:n_train])
        parts["val"].append(ids[n_train : n_train + n_val])
        parts["test"].append(ids[n_train + n_val :])
    return {s: rng.permutation(np.concatenate(parts[s]).astype(np.int64)) for s in SPLITS}


def allocate_shards(counts: dict[str, int], row_bytes: int, shards: int | None) -> dict[str, int]:
    """Shards per split: ``shards`` in all, shared in proportion to rows (at least one
    per non-empty split, at most one per row); by default about 256 MiB per shard."""
    total = sum(counts.values())
    if shards is None:
        return {
            s: min(n, max(1, math.ceil(n * row_bytes / TARGET_SHARD_BYTES))) if n else 0
            for s, n in counts.items()
        }
    if shards < 1:
        raise UsageError(f"--shards {shards}: must be >= 1")
    raw = {s: shards * n / total for s, n in counts.items()}
    alloc = {s: 1 if n else 0 for s, n in counts.items()}
    while sum(alloc.values()) < shards:
        room = [s for s in SPLITS if alloc[s] < counts[s]]
        if not room:
            break
        best = max(room, key=lambda s: (raw[s] - alloc[s], -SPLITS.index(s)))
        alloc[best] += 1
    return {s: min(alloc[s], counts[s]) for s in SPLITS}


def open_source(cfg: StageConfig) -> Source:
    """Build the configured source; every input problem is raised here, before any write."""
    kind = cfg.source
    if kind not in SOURCE_KINDS:
        raise UsageError(f"--source {kind}: must be one of {', '.join(SOURCE_KINDS)}")
    if kind in kinds.STAGE_PATHS and cfg.path is None:
        raise UsageError(f"--source {kind} needs --path")
    if kind not in kinds.STAGE_PATHS and cfg.path is not None:
        raise UsageError(f"--source {kind} takes no --path")
    if kind == kinds.STAGE_SYNTHETIC:
        h, w = cfg.image_size or (32, 32)
        if min(h, w) < 1 or cfg.channels < 1:
            raise UsageError(f"--image-size {h} {w} / --channels {cfg.channels}: must be positive")
        check_synthetic_fits(cfg, (cfg.channels, h, w))
        return SyntheticSource(cfg.num_samples, cfg.num_classes, (cfg.channels, h, w), cfg.seed)
    if kind == kinds.DIGITS:
        return digits_source()
    if kind == kinds.NPZ:
        return npz_source(Path(cfg.path), cfg.layout)  # type: ignore[arg-type]
    return ImageFolderSource(
        Path(cfg.path),
        cfg.image_size or (224, 224),  # type: ignore[arg-type]
        cfg.channels,
        cfg.resize,
        cfg.max_bad,
        cfg.workers,
    )


#: Most images or classes a synthetic dataset may have: beyond these a typo, not a plan
#: (ImageNet-21k has 14 M images in 21841 classes).
MAX_SYNTHETIC_SAMPLES = 1 << 31
MAX_SYNTHETIC_CLASSES = 1 << 16
MAX_SYNTHETIC_SIDE = 1 << 14


def synthetic_needs(
    num_samples: int, num_classes: int, shape: tuple[int, int, int]
) -> tuple[int, int]:
    """(memory, disk) bytes that staging a synthetic dataset needs: the class patterns
    (float64 while built, at 16 strength levels), labels and split ids, and the shards."""
    pixels = shape[0] * shape[1] * shape[2]
    memory = 160 * num_classes * pixels + 5 * pixels + (1 << 24) + 48 * num_samples
    disk = num_samples * (pixels + 16)
    return memory, disk


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_disk(out: Path) -> int | None:
    """Free bytes of the filesystem that would hold ``out`` (its nearest existing parent)."""
    here = Path(os.path.abspath(out)).parent
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def check_synthetic_fits(cfg: StageConfig, shape: tuple[int, int, int]) -> None:
    """Refuse, before any allocation, a synthetic dataset beyond the sane limits (exit 2)
    or beyond this machine's memory or the output's free disk (exit 1, like a full disk):
    ``--num-samples 1e12`` would ask for 7 TiB of labels alone. One line naming the
    options and the bytes they would take."""
    n, k = cfg.num_samples, cfg.num_classes
    if not 1 <= n <= MAX_SYNTHETIC_SAMPLES:
        raise UsageError(f"--num-samples {n}: must be 1..{MAX_SYNTHETIC_SAMPLES}")
    if not 2 <= k <= MAX_SYNTHETIC_CLASSES:
        raise UsageError(
            f"--num-classes {k}: must be 2..{MAX_SYNTHETIC_CLASSES} "
            "(a classifier needs at least two classes)"
        )
    if max(shape[1:]) > MAX_SYNTHETIC_SIDE:
        raise UsageError(
            f"--image-size {shape[1]} {shape[2]}: each side must be at most {MAX_SYNTHETIC_SIDE}"
        )
    memory, disk = synthetic_needs(n, k, shape)
    what = f"--num-samples {n}, --num-classes {k}, --image-size {shape[1]} {shape[2]}"
    have = _available_memory()
    if have is not None and memory > have:  # the machine fails a sane request: exit 1
        raise OSError(
            errno.ENOMEM,
            f"Cannot allocate memory: {what} needs about "
            f"{memory / 2**30:.1f} GiB to stage, {have / 2**30:.1f} GiB available",
        )
    free = _free_disk(cfg.out)
    if free is not None and disk > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {what} needs about "
            f"{disk / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free",
            str(cfg.out),
        )
