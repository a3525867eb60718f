"""Read one split of a staged dataset: memory-mapped shards behind ``ArrayDataset``.

Each rank maps the shard files and copies out only the rows a batch asks for,
so memory use does not grow with the dataset and ranks on one node share the
page cache. ``open_split`` checks the files it maps against the manifest
before training starts, so a corrupt or truncated copy stops the job with the
file's name instead of producing silently wrong batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    FileEntry,
    check_file,
    load_index,
    load_manifest,
    read_npy_header,
)
from scalelab.errors import BadInputData, DataError, UsageError
from scalelab.fsio import sha256_file

#: written by nodelocal.localize into a verified node-local copy
LOCAL_MARKER = ".scalelab-local.json"


class ShardedSplit:
    """One split (train/val/test) of a staged dataset; implements ``ArrayDataset``."""

    def __init__(self, data_dir: Path, split: str, index: dict[str, Any]):
        self.data_dir = Path(data_dir)
        self.split = split
        self.classes: list[str] = list(index["classes"])
        self.num_classes = len(self.classes)
        self.image_shape: tuple[int, int, int] = tuple(index["image_shape"])  # type: ignore[assignment]
        self.dtype = np.dtype(index["dtype"])
        info = index["splits"][split]
        self._shards = info["shards"]
        self._starts = np.array([s["start"] for s in self._shards], dtype=np.int64)
        self._stops = np.array([s["stop"] for s in self._shards], dtype=np.int64)
        self._len = int(info["count"])
        scale = float(index["scale"])
        mean = np.asarray(index["normalization"]["mean"], dtype=np.float64)
        std = np.asarray(index["normalization"]["std"], dtype=np.float64)
        # (v * scale - mean) / std  ==  v * a + b, computed in float32
        self._a = (scale / std).astype(np.float32).reshape(1, -1, 1, 1)
        self._b = (-mean / std).astype(np.float32).reshape(1, -1, 1, 1)
        self.mean = mean.tolist()
        self.std = std.tolist()
        self._check_headers()
        self.labels = self._concat("labels")
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (
            f"ShardedSplit({str(self.data_dir)!r}, {self.split!r}: {self._len} images "
            f"{self.image_shape}, {self.num_classes} classes, {len(self._shards)} shards)"
        )

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalized float32 images (N, C, H, W) and int64 labels, in the order given."""
        raw, labels = self.raw_batch(indices)
        images = raw.astype(np.float32)
        images *= self._a
        images += self._b
        return images, labels

    def raw_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored values (before scale and normalization) and labels."""
        idx = self._check_indices(indices)
        out = np.empty((len(idx), *self.image_shape), dtype=self.dtype)
        shard_of = np.searchsorted(self._stops, idx, side="right")
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            out[where] = self._images(int(s))[idx[where] - self._starts[s]]
        return out, self.labels[idx]

    def source_ids(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The source item id of each row (e.g. the index into sklearn's digits)."""
        ids = self._concat("ids")
        return ids if indices is None else ids[self._check_indices(indices)]

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise IndexError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"index out of range for {self.split} split of {self._len} images")
        return idx

    def _path(self, rel: str) -> Path:
        return self.data_dir / rel

    def _images(self, s: int) -> np.ndarray:
        arr = self._maps.get(s)
        if arr is None:
            path = self._path(self._shards[s]["images"])
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot map shard ({exc})") from None
            self._maps[s] = arr
        return arr

    def _concat(self, kind: str) -> np.ndarray:
        parts = []
        for shard in self._shards:
            path = self._path(shard[kind])
            try:
                parts.append(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: unreadable ({exc})") from None
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _check_headers(self) -> None:
        """Shapes and dtypes in the .npy headers must agree with the index (cheap, always)."""
        for shard in self._shards:
            rows = shard["stop"] - shard["start"]
            expect = {
                "images": ((rows, *self.image_shape), self.dtype),
                "labels": ((rows,), np.dtype(np.int64)),
                "ids": ((rows,), np.dtype(np.int64)),
            }
            for kind, (shape, dtype) in expect.items():
                path = self._path(shard[kind])
                got_shape, got_dtype = read_npy_header(path)
                if got_shape != shape or got_dtype != dtype:
                    raise DataError(
                        f"{path}: holds {got_dtype} {got_shape}, {INDEX_NAME} says {dtype} {shape}"
                    )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory maps (DataLoader workers map the files again)."""
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


def split_files(index: dict[str, Any], split: str) -> list[str]:
    """Relative paths of the files a reader of ``split`` opens."""
    files = []
    for shard in index["splits"][split]["shards"]:
        files.extend(shard[k] for k in ("images", "labels", "ids"))
    return files


def _trusted_local(data_dir: Path, manifest: dict[str, FileEntry], files: list[str]) -> bool:
    """True when ``data_dir`` is a node-local copy that localize verified and that
    has not changed since (same manifest, same size and mtime of every file).

    Saves every rank on a node from re-hashing what the node's copy step has
    just hashed; a truncated or rewritten file changes size or mtime.
    """
    marker = data_dir / LOCAL_MARKER
    try:
        info = json.loads(marker.read_text())
        manifest_sha = sha256_file(data_dir / MANIFEST_NAME)
        if info.get("manifest_sha256") != manifest_sha:
            return False
        stats = info["files"]
        for rel in files:
            st = (data_dir / rel).stat()
            if stats[rel] != [st.st_size, st.st_mtime_ns] or st.st_size != manifest[rel].size:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def open_split(data_dir: str | Path, split: str, verify: bool = True) -> ShardedSplit:
    """Open ``split`` of the staged dataset in ``data_dir`` for reading.

    With ``verify`` (the default) the index and every file of this split are
    checked against the manifest (size and sha256) first; without it, sizes
    only. Raises ``DataError`` naming the file on any mismatch.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: no such dataset directory")
    manifest = load_manifest(data_dir)
    check_file(data_dir, manifest[INDEX_NAME], hash_contents=True)  # small, always hashed
    index = load_index(data_dir)
    if split not in index["splits"]:
        raise BadInputData(  # a split the user named that is not there: exit 2
            f"{data_dir / INDEX_NAME}: no split {split!r} (has {', '.join(index['splits'])})"
        )
    files = split_files(index, split)
    missing = [rel for rel in files if rel not in manifest]
    if missing:
        raise DataError(f"{data_dir / missing[0]}: not listed in {MANIFEST_NAME}")
    hash_contents = verify and not _trusted_local(data_dir, manifest, files)
    for rel in files:
        check_file(data_dir, manifest[rel], hash_contents=hash_contents)
    return ShardedSplit(data_dir, split, index)
