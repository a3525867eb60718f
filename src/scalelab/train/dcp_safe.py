"""Read a distributed checkpoint without running code from it.

torch's ``FileSystemReader`` unpickles a DCP checkpoint's ``.metadata`` with plain
``pickle.load``, and its default load planner reads every non-tensor entry with
``torch.load(weights_only=False)``. A checkpoint's ``SHA256SUMS`` proves integrity, not
origin: a shared or imported checkpoint with a crafted pickle and recomputed checksums
would run its code on ``--resume``. Here the metadata is unpickled with an allow-list
of the exact classes DCP writes (:func:`allowed_globals`, the way
``torch.load(weights_only=True)`` restricts a ``.pt``), every storage entry must name a
file of the checkpoint directory, and non-tensor entries are read with
``weights_only=True``. Anything else is refused with :class:`UnsafeCheckpoint` (exit 1).
"""

from __future__ import annotations

import io
import pickle
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from scalelab.errors import CheckFailed

#: DCP's metadata file inside a checkpoint directory.
METADATA = ".metadata"
_DCP_META = "torch.distributed.checkpoint.metadata"


class UnsafeCheckpoint(CheckFailed):
    """A checkpoint whose checksums verify but whose content could run code (or reach
    outside its directory): refused, never skipped for an older one."""


@cache
def allowed_globals() -> frozenset[tuple[str, str]]:
    """(module, name) of every global a DCP ``.metadata`` pickle may name: the metadata
    dataclasses, torch.Size, the dtypes, the layout lookup and a path (nothing that
    runs code)."""
    names = {
        (_DCP_META, n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
            "StorageMeta",
            "MetadataIndex",
        )
    }
    names |= {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
    }  # StorageMeta.checkpoint_id (the writer's path)
    names |= {("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
    return frozenset(names)


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only :func:`allowed_globals`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in allowed_globals():
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check_storage(metadata: Metadata, directory: Path) -> None:
    """Every storage entry points at a plain file of ``directory`` (no path escapes)."""
    present = {p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink()}
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise UnsafeCheckpoint(f"{directory / METADATA}: storage_data is not a mapping")
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or name not in present:
            raise UnsafeCheckpoint(
                f"{directory / METADATA}: a storage entry names "
                f"{str(name)[:80]!r}, not a file of the checkpoint"
            )


def load_metadata(data: bytes, directory: Path) -> Metadata:
    """Unpickle DCP metadata with the allow-list; UnsafeCheckpoint for anything else."""
    where = directory / METADATA
    try:
        metadata = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # any malformed or forbidden pickle: refused the same way
        raise UnsafeCheckpoint(
            f"{where}: refused to unpickle ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); "
            "only DCP metadata types are allowed"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{where}: holds a {type(metadata).__name__}, not DCP metadata")
    _check_storage(metadata, directory)
    return metadata


def read_metadata(directory: Path) -> Metadata:
    """The checked metadata of the DCP checkpoint ``directory``."""
    return load_metadata((directory / METADATA).read_bytes(), directory)


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through :func:`load_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # rank-local metadata: scalelab never writes it
            raise UnsafeCheckpoint(f"{self.path}: no {METADATA} (rank-local metadata is not read)")
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # a forbidden global or a malformed entry
            raise UnsafeCheckpoint(
                f"checkpoint entry {read_item.dest_index.fqn}: refused "
                f"({str(exc).splitlines()[0][:160]})"
            ) from None
        super().load_bytes(read_item, _saved(obj))


def _saved(obj: Any) -> io.BytesIO:
    """``obj`` as the bytes the parent planner reads back (already checked: plain data)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def unsafe_cause(exc: BaseException) -> UnsafeCheckpoint | None:
    """The UnsafeCheckpoint behind ``exc``: itself, or one of the per-rank errors that a
    DCP CheckpointException wraps."""
    if isinstance(exc, UnsafeCheckpoint):
        return exc
    for failure in (getattr(exc, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, UnsafeCheckpoint):
            return inner
    return None
