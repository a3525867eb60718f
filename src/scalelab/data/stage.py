"""Stage a dataset: split it, write it as checksummed shards, publish it atomically.

Why shards: a parallel filesystem serves a few large files far better than
millions of small ones, and a rank reading memory-mapped shards touches only
the rows it asks for. Why atomic: the output directory appears (by rename)
only once every shard, the index and the manifest are written and synced, so
an interrupted or failed run never leaves something that looks complete.
Why deterministic: item order, split, shard boundaries and file bytes depend
only on the input and the seed, so re-staging reproduces the same checksums.

The format is described in docs/data-format.md.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    SPLITS,
    FileEntry,
    dumps,
    fsync_dir,
    manifest_dict,
    write_bytes_synced,
)
from scalelab.data.progress import Progress
from scalelab.data.shardwrite import _Lane, _ShardWriter, _write_small
from scalelab.data.sources import Source
from scalelab.data.stageplan import allocate_shards, open_source, parse_fractions, plan_split
from scalelab.errors import DataError, UsageError
from scalelab.output_guard import guard, replace_dir, write_marker
from scalelab.tools import pid_alive

#: normalization statistics use the first rows of the (shuffled, so uniformly
#: sampled) train split: all of it up to max(STATS_MIN_IMAGES, STATS_BYTES of images)
STATS_MIN_IMAGES = 1000
STATS_BYTES = 64 << 20

#: bytes of images loaded and written per step (bounds memory, keeps the disk busy)
CHUNK_BYTES = 16 << 20
ITEM_NAMES_FILE = "items.txt"
#: at most this many skipped file names are listed in the index
MAX_LISTED_SKIPPED = 1000


@dataclass
class StageConfig:
    """What to stage and how; field names match the ``scalelab data stage`` options."""

    source: str
    out: Path
    path: Path | None = None
    seed: int = 0
    split: str | tuple[float, float, float] = (0.8, 0.1, 0.1)
    shards: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int = 3
    num_classes: int = 10
    num_samples: int = 10000
    max_bad: str | int | float = "0.1%"
    resize: str = "crop"
    layout: str = "auto"
    workers: int | None = None
    force: bool = False
    progress: bool | None = None


@dataclass
class StageResult:
    """What was written, and how fast."""

    out: Path
    counts: dict[str, int]
    images: int
    bytes: int
    files: int
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """The one-line throughput report printed at the end of staging."""
        splits = " / ".join(f"{s} {self.counts[s]}" for s in SPLITS)
        line = (
            f"staged {self.images} images ({splits}) into {self.files} files at {self.out}: "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s = {self.mb_per_s:.1f} MB/s, "
            f"{self.images_per_s:.0f} images/s"
        )
        if self.skipped:
            line += f"; skipped {len(self.skipped)} unreadable image(s), listed in {INDEX_NAME}"
        return line


class _Stats:
    """Per-channel sum and sum of squares of the train images (exact for uint8)."""

    def __init__(self, channels: int, dtype: np.dtype):
        self.exact = dtype == np.uint8
        acc = np.uint64 if self.exact else np.float64
        self.acc = acc
        self.s1 = np.zeros(channels, dtype=acc)
        self.s2 = np.zeros(channels, dtype=acc)
        self.n = 0
        self.images = 0

    def update(self, images: np.ndarray) -> None:
        if not len(images):
            return
        flat = images.reshape(images.shape[0], images.shape[1], -1)
        self.s1 += flat.sum(axis=(0, 2), dtype=self.acc)
        self.s2 += np.einsum("ncp,ncp->c", flat, flat, dtype=self.acc)
        self.n += flat.shape[0] * flat.shape[2]
        self.images += flat.shape[0]

    def mean_std(self, scale: float) -> tuple[list[float], list[float]]:
        """Mean and std of ``value * scale`` per channel; a constant channel gets std 1."""
        means, stds = [], []
        for s1, s2 in zip(self.s1.tolist(), self.s2.tolist(), strict=True):
            if self.exact:  # Python ints: no rounding before the final division
                mean = s1 / self.n
                var = (s2 * self.n - s1 * s1) / (self.n * self.n)
            else:
                mean = s1 / self.n
                var = max(s2 / self.n - mean * mean, 0.0)
            std = math.sqrt(var) * scale
            means.append(mean * scale)
            stds.append(std if std > 1e-12 else 1.0)
        return means, stds


def _staging_dir(out: Path) -> Path:
    """A hidden sibling of ``out`` (same filesystem, so the final rename is atomic)."""
    host = socket.gethostname().split(".")[0] or "host"
    prefix = f".{out.name}.staging-{host}-"
    for old in out.parent.glob(prefix + "*"):  # leftovers of killed runs on this host
        pid = old.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return out.parent / f"{prefix}{os.getpid()}"


def stage(cfg: StageConfig) -> StageResult:
    """Stage ``cfg.source`` into ``cfg.out``; see the module docstring for guarantees.

    The writer lock of ``--out`` is held from the first check to the final rename, so
    a second ``stage`` into the same directory is refused at once instead of silently
    replacing the first one's dataset.
    """
    out = Path(cfg.out).absolute()
    if (out.exists() or out.is_symlink()) and not cfg.force:
        raise UsageError(f"--out {out}: already exists; pass --force to replace it")
    # --force replaces only a dataset staged here before that holds nothing else.
    with guard(out, "dataset", [cfg.path] if cfg.path else [], force=cfg.force):
        return _stage(cfg, out)


def _stage(cfg: StageConfig, out: Path) -> StageResult:
    t0 = time.perf_counter()
    fractions = parse_fractions(cfg.split)
    if cfg.seed < 0:
        raise UsageError(f"--seed {cfg.seed}: must be >= 0")
    source = open_source(cfg)
    plan = plan_split(source.labels, len(source.classes), fractions, cfg.seed)
    counts = {s: len(plan[s]) for s in SPLITS}
    if counts["train"] == 0:
        raise DataError(
            f"--split {cfg.split}: the train split would be empty ({len(source.labels)} items)"
        )
    row_bytes = int(np.prod(tuple(source.image_shape))) * source.dtype.itemsize
    chunks = _chunks(
        plan,
        allocate_shards(counts, row_bytes, cfg.shards),
        max(1, min(source.max_chunk_rows, CHUNK_BYTES // row_bytes)),
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    shards = _ShardPass(tmp, source, row_bytes)
    try:
        tmp.mkdir()
        for split in SPLITS:
            (tmp / split).mkdir()
        shards.run(chunks, cfg.progress)
        entries, shard_records = shards.records()
        if shards.kept["train"] == 0:
            raise DataError(f"{cfg.path}: no readable images left in the train split")
        names = source.item_names()
        if names is not None:
            entries.append(_write_small(tmp, ITEM_NAMES_FILE, ("\n".join(names) + "\n").encode()))
        index = _index(cfg, source, fractions, shards, shard_records, names is not None)
        entries.append(_write_small(tmp, INDEX_NAME, dumps(index)))
        write_bytes_synced(tmp / MANIFEST_NAME, dumps(manifest_dict(entries)))
        for split in SPLITS:
            fsync_dir(tmp / split)
        write_marker(tmp, "dataset")  # what a later --force may replace: these files only
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shards.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    written = sum(e.size for e in entries) + (out / MANIFEST_NAME).stat().st_size
    return StageResult(
        out,
        shards.kept,
        sum(shards.kept.values()),
        written,
        len(entries) + 1,
        seconds,
        list(source.skipped),
    )


#: One chunk of a shard: split, shard number, item ids, last chunk of its shard, shard rows.
_Chunk = tuple[str, int, np.ndarray, bool, int]


def _chunks(plan: dict[str, np.ndarray], n_shards: dict[str, int], chunk_rows: int) -> list[_Chunk]:
    """Every split's items cut into shards, each shard into chunks of ``chunk_rows``."""
    chunks: list[_Chunk] = []
    for split in SPLITS:
        if not len(plan[split]):
            continue
        for k, shard_ids in enumerate(np.array_split(plan[split], n_shards[split])):
            for j in range(0, len(shard_ids), chunk_rows):
                last = j + chunk_rows >= len(shard_ids)
                chunks.append((split, k, shard_ids[j : j + chunk_rows], last, len(shard_ids)))
    return chunks


class _ShardPass:
    """One pass over the source's chunks: shards written and hashed on background lanes,
    rows and classes counted, normalization statistics fed from the first train rows."""

    def __init__(self, tmp: Path, source: Source, row_bytes: int):
        self.tmp, self.source = tmp, source
        self.writer, self.hasher, self.stats_lane = _Lane("writer"), _Lane("hasher"), _Lane("stats")
        self.stats = _Stats(tuple(source.image_shape)[0], source.dtype)
        self.stats_rows = max(STATS_MIN_IMAGES, STATS_BYTES // row_bytes)
        self.stats_fed = 0
        self.current: _ShardWriter | None = None
        self.opened: list[_ShardWriter] = []
        self.finished: list[tuple[str, int, int, Future[list[FileEntry]]]] = []
        self.kept: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.class_counts = {s: np.zeros(len(source.classes), dtype=np.int64) for s in SPLITS}

    def run(self, chunks: list[_Chunk], progress: bool | None) -> None:
        """Load, write and hash every chunk; wait until every lane is done."""
        loads = self.source.iter_load(c[2] for c in chunks)
        total = len(self.source.labels)
        with Progress(f"staging {self.source.kind}", total, "images", progress) as bar:
            for chunk, (images, ids) in zip(chunks, loads, strict=True):
                self._add(chunk, images, ids)
                bar.advance(len(chunk[2]))
                if chunk[3]:
                    self._finish_shard(chunk[0])
        self.hasher.close()
        self.writer.close()
        self.stats_lane.close()

    def _add(self, chunk: _Chunk, images: np.ndarray, ids: np.ndarray) -> None:
        split, k, _, _, planned = chunk
        if self.current is None:
            self.current = _ShardWriter(
                self.tmp,
                split,
                k,
                planned,
                tuple(self.source.image_shape),
                self.source.dtype,
                self.writer,
                self.hasher,
            )
            self.opened.append(self.current)
        labels = self.source.labels[ids]
        self.current.append(images, labels, ids)
        if split == "train" and self.stats_fed < self.stats_rows:
            sample = images[: self.stats_rows - self.stats_fed]
            self.stats_lane.submit(self.stats.update, sample)
            self.stats_fed += len(sample)
        self.class_counts[split] += np.bincount(labels, minlength=len(self.source.classes))

    def _finish_shard(self, split: str) -> None:
        assert self.current is not None
        self.finished.append((split, self.kept[split], self.current.rows, self.current.finish()))
        self.kept[split] += self.current.rows
        self.current = None

    def records(self) -> tuple[list[FileEntry], dict[str, list[dict[str, Any]]]]:
        """The manifest entries of the shards written, and each split's shard records."""
        entries: list[FileEntry] = []
        shard_records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for split, start, rows, future in self.finished:
            files = future.result()
            if files:
                entries.extend(files)
                shard_records[split].append(
                    {
                        "images": files[0].path,
                        "labels": files[1].path,
                        "ids": files[2].path,
                        "start": start,
                        "stop": start + rows,
                    }
                )
        return entries, shard_records

    def abort(self) -> None:
        self.hasher.abort()
        self.writer.abort()
        self.stats_lane.abort()
        for shard in self.opened:
            shard.abort()


def _index(
    cfg: StageConfig,
    source: Source,
    fractions: tuple[float, float, float],
    shards: _ShardPass,
    shard_records: dict[str, list[dict[str, Any]]],
    has_names: bool,
) -> dict[str, Any]:
    """index.json: how the dataset was made, its normalization and its shards."""
    mean, std = shards.stats.mean_std(source.scale)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": source.describe(),
        "seed": cfg.seed,
        "fractions": dict(zip(SPLITS, fractions, strict=True)),
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image_shape": list(tuple(source.image_shape)),
        "layout": "NCHW",
        "dtype": source.dtype.name,
        "scale": source.scale,
        "normalization": {
            "mean": mean,
            "std": std,
            "computed_on": "train",
            "images": shards.stats.images,
            "formula": "(value * scale - mean[c]) / std[c]",
        },
        "item_names": ITEM_NAMES_FILE if has_names else None,
        "skipped": {"count": len(source.skipped), "items": source.skipped[:MAX_LISTED_SKIPPED]},
        "splits": {
            s: {
                "count": shards.kept[s],
                "class_counts": shards.class_counts[s].tolist(),
                "shards": shard_records[s],
            }
            for s in SPLITS
        },
    }


def run_and_report(cfg: StageConfig) -> StageResult:
    """Stage and print the throughput line (used by the CLI)."""
    result = stage(cfg)
    print(result.summary(), file=sys.stdout, flush=True)
    return result
