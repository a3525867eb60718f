"""Write shard files in the background: writer and hasher lanes, synced writes, writeback."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from scalelab.data.manifest import FileEntry, npy_header, write_bytes_synced
from scalelab.fsio import sized_sha256

T = TypeVar("T")


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

    def __init__(
        self,
        root: Path,
        split: str,
        number: int,
        planned: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype,
        writer: _Lane,
        hasher: _Lane,
    ):
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

    def _finish(
        self, rows: int, labels: np.ndarray, ids: np.ndarray, streamed_digest: Future[str]
    ) -> list[FileEntry]:
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
