"""``scalelab data verify``: check a staged dataset completely.

Every file in the manifest (size and sha256), the index's own consistency
(row ranges, class counts) and every .npy header against the index. All
problems are collected; the error names the first bad file and counts the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    SPLITS,
    check_file,
    load_index,
    load_manifest,
    read_npy_header,
)
from scalelab.data.progress import Progress
from scalelab.errors import DataError, UsageError

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What a successful verification covered."""

    data_dir: Path
    files: int
    bytes: int
    counts: dict[str, int]
    hashed: bool

    def summary(self) -> str:
        what = "sha256 and size" if self.hashed else "size only"
        splits = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        return (
            f"OK {self.data_dir}: {self.files} files, {self.bytes / 1e6:.1f} MB ({what}); {splits}"
        )

    def as_verdict(self) -> dict[str, Any]:
        """The passed verdict as ``scalelab data verify --json`` prints it."""
        return {
            "ok": True,
            "data_dir": str(self.data_dir),
            "files": self.files,
            "bytes": self.bytes,
            "hashed": self.hashed,
            "counts": self.counts,
            "problems": [],
        }


def verify_dataset(
    data_dir: str | Path, *, hash_contents: bool = True, progress: bool | None = None
) -> VerifyReport:
    """Raise ``DataError`` (naming the file) unless ``data_dir`` is intact."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: no such dataset directory")
    manifest = load_manifest(data_dir)
    problems: list[str] = []
    bad: set[str] = set()
    total = sum(e.size for e in manifest.values())
    with Progress(f"verifying {data_dir.name}", total, "bytes", progress) as bar:
        for entry in manifest.values():
            try:
                check_file(data_dir, entry, hash_contents=hash_contents, on_bytes=bar.advance)
            except DataError as exc:
                problems.append(str(exc))
                bad.add(entry.path)
    counts: dict[str, int] = {}
    if INDEX_NAME not in bad:
        try:
            index = load_index(data_dir)
            counts = {
                s: index["splits"][s]["count"] for s in sorted(index["splits"], key=_split_order)
            }
            problems.extend(_check_index(data_dir, index, manifest, bad))
        except DataError as exc:
            problems.append(str(exc))
    for extra in _unlisted(data_dir, manifest):
        log.warning("%s: not listed in %s (ignored)", data_dir / extra, MANIFEST_NAME)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        for p in problems[1:]:
            log.warning("also: %s", p)
        error = DataError(problems[0] + more)
        # the whole list, for a failed verdict printed as JSON (scalelab.cli)
        error.details = {"data_dir": str(data_dir), "hashed": hash_contents, "problems": problems}
        raise error
    total += (data_dir / MANIFEST_NAME).stat().st_size
    return VerifyReport(data_dir, len(manifest) + 1, total, counts, hash_contents)


def _check_index(
    data_dir: Path, index: dict[str, Any], manifest: dict[str, Any], bad: set[str]
) -> list[str]:
    """Cross-check the index against the manifest and the shards' headers and labels
    (files in ``bad`` already failed their checksum and are not read again)."""
    problems = []
    shape = tuple(index["image_shape"])
    dtype = np.dtype(index["dtype"])
    num_classes = len(index["classes"])
    for split, info in index["splits"].items():
        class_counts = np.zeros(num_classes, dtype=np.int64)
        complete = True
        for shard in info["shards"]:
            rows = shard["stop"] - shard["start"]
            expect = {
                "images": ((rows, *shape), dtype),
                "labels": ((rows,), np.dtype(np.int64)),
                "ids": ((rows,), np.dtype(np.int64)),
            }
            for kind, (want_shape, want_dtype) in expect.items():
                rel = shard[kind]
                path = data_dir / rel
                if rel not in manifest:
                    problems.append(f"{path}: in {INDEX_NAME} but not in {MANIFEST_NAME}")
                    complete = False
                    continue
                if rel in bad:
                    complete = False
                    continue
                try:
                    got_shape, got_dtype = read_npy_header(path)
                    if got_shape != want_shape or got_dtype != want_dtype:
                        raise DataError(
                            f"{path}: holds {got_dtype} {got_shape}, "
                            f"{INDEX_NAME} says {want_dtype} {want_shape}"
                        )
                    if kind == "labels":
                        class_counts += _label_counts(path, num_classes)
                except DataError as exc:
                    problems.append(str(exc))
                    complete = False
        listed = info.get("class_counts")
        if listed is not None and complete and class_counts.tolist() != listed:
            problems.append(
                f"{data_dir / INDEX_NAME}: field 'splits.{split}.class_counts' "
                "does not match the labels in the shards"
            )
    return problems


def _label_counts(path: Path, num_classes: int) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    return np.bincount(labels, minlength=num_classes)


def _split_order(name: str) -> tuple[int, str]:
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def _unlisted(data_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Non-hidden files in the dataset that the manifest does not list."""
    found = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        hidden = any(p.startswith(".") for p in rel.parts)
        if path.is_file() and not hidden and str(rel) not in manifest and str(rel) != MANIFEST_NAME:
            found.append(str(rel))
    return found
