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

import errno
import math
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

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
    npy_header,
    write_bytes_synced,
)
from scalelab.data.progress import Progress
from scalelab.data.sources import (
    SOURCE_KINDS,
    ImageFolderSource,
    Source,
    SyntheticSource,
    digits_source,
    npz_source,
)
from scalelab.errors import DataError, UsageError
from scalelab.fsio import guard, replace_dir, sized_sha256, write_marker
from scalelab.tools import pid_alive

T = TypeVar("T")

#: normalization statistics use the first rows of the (shuffled, so uniformly
#: sampled) train split: all of it up to max(STATS_MIN_IMAGES, STATS_BYTES of images)
STATS_MIN_IMAGES = 1000
STATS_BYTES = 64 << 20

#: shard size aimed at when --shards is not given
TARGET_SHARD_BYTES = 256 << 20
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


def plan_split(labels: np.ndarray, num_classes: int, fractions: tuple[float, float, float],
               seed: int) -> dict[str, np.ndarray]:
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
        ids = rng.permutation(order[bounds[c]:bounds[c + 1]])
        n = len(ids)
        n_val = min(n, math.floor(n * fractions[1] + 0.5))
        n_test = min(n - n_val, math.floor(n * fractions[2] + 0.5))
        n_train = n - n_val - n_test
        parts["train"].append(ids[:n_train])
        parts["val"].append(ids[n_train:n_train + n_val])
        parts["test"].append(ids[n_train + n_val:])
    return {s: rng.permutation(np.concatenate(parts[s]).astype(np.int64)) for s in SPLITS}


def allocate_shards(counts: dict[str, int], row_bytes: int, shards: int | None) -> dict[str, int]:
    """Shards per split: ``shards`` in all, shared in proportion to rows (at least one
    per non-empty split, at most one per row); by default about 256 MiB per shard."""
    total = sum(counts.values())
    if shards is None:
        return {s: min(n, max(1, math.ceil(n * row_bytes / TARGET_SHARD_BYTES))) if n else 0
                for s, n in counts.items()}
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


class _Lane:
    """Runs jobs on one background thread, in submission order.

    Staging uses three: one writes shard bytes, one hashes the same buffers,
    one accumulates the normalization statistics. numpy, hashlib and file
    writes release the GIL, so producing, hashing and writing overlap; that is
    what lets staging approach the disk's sequential write speed. ``submit`` blocks while more
    than ``max_pending`` jobs wait, which bounds the memory held by queued chunks.
    """

    def __init__(self, name: str, max_pending: int = 3):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"scalelab-stage-{name}")
        self._pending: deque[Future[Any]] = deque()
        self._max = max_pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; its error, if any, is raised by a later submit or drain."""
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._max:
            self._pending.popleft().result()

    def call(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn`` after everything submitted so far; the caller owns the future."""
        return self._pool.submit(fn, *args)

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every job, ``call`` ones included; raise the first queued error."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop after the job in progress, dropping queued ones and their errors."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def _write_all(fh: BinaryIO, buf: Any) -> None:
    """Write all of ``buf`` to an unbuffered file (raw writes may be partial)."""
    view = memoryview(buf).cast("B")
    start = fh.tell()
    while view:
        n = fh.write(view)
        view = view[n:]
    _start_writeback(fh.fileno(), start, fh.tell() - start)


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk
    without waiting. The disk then works while later chunks are produced, instead
    of all at the final fsync. A no-op where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors surface at fsync

    return start


_start_writeback = _load_sync_file_range()


class _ShardWriter:
    """One shard: ``<split>/shard-NNNNN.{images,labels,ids}.npy``."""

    def __init__(self, root: Path, split: str, number: int, planned: int,
                 row_shape: tuple[int, ...], dtype: np.dtype, writer: _Lane, hasher: _Lane):
        import hashlib

        self.root = root
        self.stem = f"{split}/shard-{number:05d}"
        self.planned = planned
        self.rows = 0
        self.row_shape = row_shape
        self.dtype = np.dtype(dtype)
        self.labels: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self._writer = writer
        self._hasher = hasher
        self._path = root / f"{self.stem}.images.npy"
        self._fh = open(self._path, "wb", buffering=0)  # noqa: SIM115 - closed in _finish/abort
        self._digest = hashlib.sha256()
        self._header = npy_header(self.dtype, (planned, *row_shape))
        self._push(self._header)

    def _push(self, buf: Any) -> None:
        # the same immutable buffer goes to both lanes: hashing and writing overlap
        self._hasher.submit(self._digest.update, buf)
        self._writer.submit(_write_all, self._fh, buf)

    def append(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        if not len(images):
            return
        self._push(np.ascontiguousarray(images, dtype=self.dtype))
        self.rows += len(images)
        self.labels.append(labels.astype(np.int64, copy=False))
        self.ids.append(ids.astype(np.int64, copy=False))

    def finish(self) -> Future[list[FileEntry]]:
        """Complete the shard on the writer thread (after its queued writes), so the
        fsync of one shard overlaps producing the next. The future gives the
        manifest entries (none if every item of the shard was skipped)."""
        labels = np.concatenate(self.labels) if self.labels else np.empty(0, np.int64)
        ids = np.concatenate(self.ids) if self.ids else np.empty(0, np.int64)
        digest = self._hasher.call(self._digest.hexdigest)
        return self._writer.call(self._finish, self.rows, labels, ids, digest)

    def _finish(self, rows: int, labels: np.ndarray, ids: np.ndarray,
                streamed_digest: Future[str]) -> list[FileEntry]:
        fh = self._fh
        try:
            if rows != self.planned:
                # some items were skipped: fix the row count in the header, rehash below
                header = npy_header(self.dtype, (rows, *self.row_shape))
                assert len(header) == len(self._header)
                fh.seek(0)
                _write_all(fh, header)
                fh.truncate(len(header) + rows * self.dtype.itemsize * int(np.prod(self.row_shape)))
            os.fsync(fh.fileno())
        finally:
            fh.close()
        if rows == 0:
            self._path.unlink()
            return []
        rel = f"{self.stem}.images.npy"
        if rows != self.planned:
            size, digest = sized_sha256(self._path)
        else:
            size, digest = self._path.stat().st_size, streamed_digest.result()
        return [
            FileEntry(rel, size, digest),
            _write_npy(self.root, f"{self.stem}.labels.npy", labels),
            _write_npy(self.root, f"{self.stem}.ids.npy", ids),
        ]

    def abort(self) -> None:
        self._fh.close()


def _write_npy(root: Path, rel: str, array: np.ndarray) -> FileEntry:
    import hashlib
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    write_bytes_synced(root / rel, data)
    return FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())


def _write_small(root: Path, rel: str, data: bytes) -> FileEntry:
    import hashlib

    write_bytes_synced(root / rel, data)
    return FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())


def open_source(cfg: StageConfig) -> Source:
    """Build the configured source; every input problem is raised here, before any write."""
    kind = cfg.source
    if kind not in SOURCE_KINDS:
        raise UsageError(f"--source {kind}: must be one of {', '.join(SOURCE_KINDS)}")
    if kind in ("imagefolder", "npz") and cfg.path is None:
        raise UsageError(f"--source {kind} needs --path")
    if kind in ("synthetic", "digits") and cfg.path is not None:
        raise UsageError(f"--source {kind} takes no --path")
    if kind == "synthetic":
        h, w = cfg.image_size or (32, 32)
        if min(h, w) < 1 or cfg.channels < 1:
            raise UsageError(f"--image-size {h} {w} / --channels {cfg.channels}: must be positive")
        check_synthetic_fits(cfg, (cfg.channels, h, w))
        return SyntheticSource(cfg.num_samples, cfg.num_classes, (cfg.channels, h, w), cfg.seed)
    if kind == "digits":
        return digits_source()
    if kind == "npz":
        return npz_source(Path(cfg.path), cfg.layout)  # type: ignore[arg-type]
    return ImageFolderSource(Path(cfg.path), cfg.image_size or (224, 224),  # type: ignore[arg-type]
                             cfg.channels, cfg.resize, cfg.max_bad, cfg.workers)


#: Most images or classes a synthetic dataset may have: beyond these a typo, not a plan
#: (ImageNet-21k has 14 M images in 21841 classes).
MAX_SYNTHETIC_SAMPLES = 1 << 31
MAX_SYNTHETIC_CLASSES = 1 << 16
MAX_SYNTHETIC_SIDE = 1 << 14


def synthetic_needs(num_samples: int, num_classes: int,
                    shape: tuple[int, int, int]) -> tuple[int, int]:
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
        raise UsageError(f"--num-classes {k}: must be 2..{MAX_SYNTHETIC_CLASSES} "
                         "(a classifier needs at least two classes)")
    if max(shape[1:]) > MAX_SYNTHETIC_SIDE:
        raise UsageError(f"--image-size {shape[1]} {shape[2]}: each side must be at most "
                         f"{MAX_SYNTHETIC_SIDE}")
    memory, disk = synthetic_needs(n, k, shape)
    what = f"--num-samples {n}, --num-classes {k}, --image-size {shape[1]} {shape[2]}"
    have = _available_memory()
    if have is not None and memory > have:  # the machine fails a sane request: exit 1
        raise OSError(errno.ENOMEM, f"Cannot allocate memory: {what} needs about "
                      f"{memory / 2**30:.1f} GiB to stage, {have / 2**30:.1f} GiB available")
    free = _free_disk(cfg.out)
    if free is not None and disk > free:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs about "
                      f"{disk / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free", str(cfg.out))


def _staging_dir(out: Path) -> Path:
    """A hidden sibling of ``out`` (same filesystem, so the final rename is atomic)."""
    host = socket.gethostname().split(".")[0] or "host"
    prefix = f".{out.name}.staging-{host}-"
    for old in out.parent.glob(prefix + "*"):  # leftovers of killed runs on this host
        pid = old.name[len(prefix):]
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
        raise DataError(f"--split {cfg.split}: the train split would be empty "
                        f"({len(source.labels)} items)")
    row_bytes = int(np.prod(tuple(source.image_shape))) * source.dtype.itemsize
    chunks = _chunks(plan, allocate_shards(counts, row_bytes, cfg.shards),
                     max(1, min(source.max_chunk_rows, CHUNK_BYTES // row_bytes)))

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
    return StageResult(out, shards.kept, sum(shards.kept.values()), written, len(entries) + 1,
                       seconds, list(source.skipped))


#: One chunk of a shard: split, shard number, item ids, last chunk of its shard, shard rows.
_Chunk = tuple[str, int, np.ndarray, bool, int]


def _chunks(plan: dict[str, np.ndarray], n_shards: dict[str, int],
            chunk_rows: int) -> list[_Chunk]:
    """Every split's items cut into shards, each shard into chunks of ``chunk_rows``."""
    chunks: list[_Chunk] = []
    for split in SPLITS:
        if not len(plan[split]):
            continue
        for k, shard_ids in enumerate(np.array_split(plan[split], n_shards[split])):
            for j in range(0, len(shard_ids), chunk_rows):
                last = j + chunk_rows >= len(shard_ids)
                chunks.append((split, k, shard_ids[j:j + chunk_rows], last, len(shard_ids)))
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
            self.current = _ShardWriter(self.tmp, split, k, planned,
                                        tuple(self.source.image_shape), self.source.dtype,
                                        self.writer, self.hasher)
            self.opened.append(self.current)
        labels = self.source.labels[ids]
        self.current.append(images, labels, ids)
        if split == "train" and self.stats_fed < self.stats_rows:
            sample = images[:self.stats_rows - self.stats_fed]
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
                shard_records[split].append({
                    "images": files[0].path, "labels": files[1].path, "ids": files[2].path,
                    "start": start, "stop": start + rows,
                })
        return entries, shard_records

    def abort(self) -> None:
        self.hasher.abort()
        self.writer.abort()
        self.stats_lane.abort()
        for shard in self.opened:
            shard.abort()


def _index(cfg: StageConfig, source: Source, fractions: tuple[float, float, float],
           shards: _ShardPass, shard_records: dict[str, list[dict[str, Any]]],
           has_names: bool) -> dict[str, Any]:
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
        "normalization": {"mean": mean, "std": std, "computed_on": "train",
                          "images": shards.stats.images,
                          "formula": "(value * scale - mean[c]) / std[c]"},
        "item_names": ITEM_NAMES_FILE if has_names else None,
        "skipped": {"count": len(source.skipped),
                    "items": source.skipped[:MAX_LISTED_SKIPPED]},
        "splits": {s: {"count": shards.kept[s], "class_counts": shards.class_counts[s].tolist(),
                       "shards": shard_records[s]} for s in SPLITS},
    }


def run_and_report(cfg: StageConfig) -> StageResult:
    """Stage and print the throughput line (used by the CLI)."""
    result = stage(cfg)
    print(result.summary(), file=sys.stdout, flush=True)
    return result
