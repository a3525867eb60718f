"""The on-disk format of a staged dataset: names, index and manifest I/O, checksums.

The writer (stage.py) and the readers (shards.py, verify.py, nodelocal.py) all
go through this module so that there is one definition of the format; the
human-readable description is docs/data-format.md.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import BadInputData, DataError
from scalelab.fsio import (
    fsync_dir,  # noqa: F401  (re-exported for stage/nodelocal)
    sha256_file,
)

FORMAT_NAME = "scalelab-shards"
FORMAT_VERSION = 1
MANIFEST_FORMAT = "scalelab-manifest"
INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
#: dtypes a shard's image array may have; labels and ids are always int64.
IMAGE_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class FileEntry:
    """What the manifest promises about one file."""

    path: str
    size: int
    sha256: str


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact header ``np.save`` writes for a C-ordered array.

    numpy reserves room for the first axis to grow, so the header length does
    not depend on the row count: a shard's header can be rewritten in place
    once the final row count is known (images that failed to decode).
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        },
    )
    return buf.getvalue()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read from its header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version != (1, 0):
                raise ValueError(f"unexpected .npy version {version}")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if fortran:
        raise DataError(f"{path}: Fortran-ordered array, expected C order")
    return tuple(shape), dtype


def dumps(obj: Any) -> bytes:
    """Deterministic JSON (fixed key order, trailing newline): same input, same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write a small file and fsync it, so a later rename never exposes a hole."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a complete staged dataset?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def load_manifest(data_dir: Path) -> dict[str, FileEntry]:
    """Parse manifest.json into entries keyed by relative path."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.exists() and not (Path(data_dir) / INDEX_NAME).exists():
        # Neither file: not a dataset at all (bad input, exit 2), not a damaged one (exit 1).
        raise BadInputData(
            f"{path}: missing, and no {INDEX_NAME} either: {data_dir} is not a staged dataset"
        )
    data = _load_json(path)
    if data.get("format") != MANIFEST_FORMAT:
        raise BadInputData(
            f"{path}: field 'format' is {data.get('format')!r}, not "
            f"{MANIFEST_FORMAT!r}: {data_dir} is not a staged dataset"
        )
    if data.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: field 'format'/'version' is {data.get('format')!r}/{data.get('version')!r}, "
            f"expected {MANIFEST_FORMAT!r}/{FORMAT_VERSION}"
        )
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(f"{path}: field 'files' must be a non-empty object")
    entries = {}
    for rel, meta in files.items():
        try:
            entry = FileEntry(rel, int(meta["bytes"]), str(meta["sha256"]))
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{path}: entry 'files.{rel}' needs 'bytes' and 'sha256'") from None
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{path}: entry 'files.{rel}' must be a path inside the dataset")
        entries[rel] = entry
    if INDEX_NAME not in entries:
        raise DataError(f"{path}: does not list {INDEX_NAME}")
    return entries


def manifest_dict(entries: list[FileEntry]) -> dict[str, Any]:
    """The JSON form of a manifest."""
    return {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "algorithm": "sha256",
        "total_bytes": sum(e.size for e in entries),
        "files": {e.path: {"bytes": e.size, "sha256": e.sha256} for e in sorted(entries, key=_key)},
    }


def _key(entry: FileEntry) -> str:
    return entry.path


def check_file(
    data_dir: Path,
    entry: FileEntry,
    *,
    hash_contents: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Raise DataError naming the file when it is missing, resized or altered."""
    path = Path(data_dir) / entry.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing (listed in {MANIFEST_NAME})") from None
    if size != entry.size:
        raise DataError(
            f"{path}: size {size} bytes, manifest says {entry.size} (truncated or replaced)"
        )
    if hash_contents:
        digest = sha256_file(path, on_bytes)
        if digest != entry.sha256:
            raise DataError(
                f"{path}: sha256 mismatch (manifest {entry.sha256[:16]}..., file {digest[:16]}...);"
                " the file is corrupt or was altered"
            )


def load_index(data_dir: Path) -> dict[str, Any]:
    """Parse and sanity-check index.json; errors name the field."""
    path = Path(data_dir) / INDEX_NAME
    index = _load_json(path)

    def need(cond: bool, field: str, what: str) -> None:
        if not cond:
            raise DataError(f"{path}: field '{field}' {what}")

    need(index.get("format") == FORMAT_NAME, "format", f"must be {FORMAT_NAME!r}")
    need(
        index.get("version") == FORMAT_VERSION,
        "version",
        f"is {index.get('version')!r}; this scalelab reads version {FORMAT_VERSION}",
    )
    classes = index.get("classes")
    need(isinstance(classes, list) and len(classes) > 0, "classes", "must be a non-empty list")
    shape = index.get("image_shape")
    need(
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and s > 0 for s in shape),
        "image_shape",
        "must be [channels, height, width]",
    )
    need(index.get("dtype") in IMAGE_DTYPES, "dtype", f"must be one of {IMAGE_DTYPES}")
    need(isinstance(index.get("scale"), (int, float)), "scale", "must be a number")
    norm = index.get("normalization", {})
    for key in ("mean", "std"):
        vals = norm.get(key) if isinstance(norm, dict) else None
        need(
            isinstance(vals, list)
            and len(vals) == shape[0]
            and all(isinstance(v, (int, float)) for v in vals),
            f"normalization.{key}",
            "must list one number per channel",
        )
    need(all(v > 0 for v in norm["std"]), "normalization.std", "must be positive")
    splits = index.get("splits")
    need(isinstance(splits, dict), "splits", "must be an object")
    for name, split in splits.items():
        field = f"splits.{name}"
        need(isinstance(split, dict), field, "must be an object")
        count = split.get("count")
        need(isinstance(count, int) and count >= 0, f"{field}.count", "must be an integer >= 0")
        shards = split.get("shards")
        need(isinstance(shards, list), f"{field}.shards", "must be a list")
        expect = 0
        for i, shard in enumerate(shards):
            sfield = f"{field}.shards[{i}]"
            need(isinstance(shard, dict), sfield, "must be an object")
            for key in ("images", "labels", "ids"):
                need(isinstance(shard.get(key), str), f"{sfield}.{key}", "must be a file name")
            need(shard.get("start") == expect, f"{sfield}.start", f"must be {expect}")
            stop = shard.get("stop")
            need(isinstance(stop, int) and stop >= expect, f"{sfield}.stop", "must be >= start")
            expect = stop
        need(expect == count, f"{field}.count", f"is {count} but the shards hold {expect} rows")
    return index
