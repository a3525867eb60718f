"""Read a SIF file's layout without Apptainer: where its root filesystem lies.

Charliecloud cannot open a SIF (``ch-convert`` 0.31 knows ch-image, dir, docker, podman,
squash and tar), so scalelab unpacks the SIF's SquashFS partition itself with
``unsquashfs -o OFFSET`` (:mod:`scalelab.container.charliecloud`). Parsing the header here
means the submit host needs no Apptainer for that (``apptainer sif list`` would).

The layout is the SIF v1 format of github.com/apptainer/sif (``pkg/sif``): a 128-byte global
header (launch script, magic ``SIF_MAGIC``, version, arch, id, times, then the descriptor
table's and the data's offsets), then packed little-endian descriptors of 585 bytes each.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import UsageError

MAGIC = b"SIF_MAGIC\x00"
_HEADER = struct.Struct("<32s10s3s3s16s8q")
#: DataType, Used, ID, GroupID, LinkedID, Offset, Size, SizeWithPadding, CreatedAt,
#: ModifiedAt, UID, GID, Name, Extra.
_DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
#: A partition's Extra starts with: Fstype, Parttype, Arch.
_PARTITION = struct.Struct("<ii3s")
DATA_PARTITION = 0x4004
DATA_GENERIC_JSON = 0x4006
INSPECT_METADATA = b"inspect-metadata.json"
#: Labels and environment scripts: kilobytes; more is not metadata.
MAX_METADATA = 16 << 20
FS_SQUASH = 1
PART_PRIM_SYS = 2
#: The most descriptors a sane SIF holds (a guard against a corrupt count).
MAX_DESCRIPTORS = 4096


@dataclass(frozen=True)
class Partition:
    """The byte range of the SIF's primary system partition (a SquashFS)."""

    offset: int
    size: int


def _header(head: bytes, where: str) -> tuple[int, int]:
    """(descriptor table offset, descriptor count) out of the global header."""
    if len(head) < _HEADER.size:
        raise UsageError(f"{where}: not a SIF file (too short)")
    fields = _HEADER.unpack_from(head)
    if fields[1] != MAGIC:
        raise UsageError(f"{where}: not a SIF file (no SIF_MAGIC)")
    _ctime, _mtime, _free, total, desc_off, desc_len, _data_off, _data_len = fields[5:]
    if not 0 < total <= MAX_DESCRIPTORS or desc_len < total * _DESCRIPTOR.size:
        raise UsageError(f"{where}: corrupt SIF header ({total} descriptors)")
    return desc_off, total


def _descriptors(path: str | Path) -> list[tuple]:
    """The used descriptors of a SIF, each as unpacked by :data:`_DESCRIPTOR`."""
    where = str(path)
    with open(path, "rb") as f:
        desc_off, total = _header(f.read(_HEADER.size), where)
        f.seek(desc_off)
        table = f.read(total * _DESCRIPTOR.size)
    if len(table) < total * _DESCRIPTOR.size:
        raise UsageError(f"{where}: truncated SIF descriptor table")
    rows = (_DESCRIPTOR.unpack_from(table, i * _DESCRIPTOR.size) for i in range(total))
    return [d for d in rows if d[1]]


def primary_partition(path: str | Path) -> Partition:
    """The primary system SquashFS partition of a SIF; one UsageError otherwise."""
    for d in _descriptors(path):
        if d[0] != DATA_PARTITION:
            continue
        fstype, parttype, _arch = _PARTITION.unpack_from(d[13])
        if parttype == PART_PRIM_SYS:
            if fstype != FS_SQUASH:
                raise UsageError(f"{path}: the system partition is not SquashFS ({fstype})")
            return Partition(offset=d[5], size=d[6])
    raise UsageError(f"{path}: no system partition in this SIF")


def inspect_metadata(path: str | Path) -> str | None:
    """The JSON Apptainer stores as ``inspect-metadata.json`` (what ``apptainer inspect
    --json`` prints: labels, environment scripts); None when the SIF has none."""
    for d in _descriptors(path):
        if d[0] == DATA_GENERIC_JSON and d[12].rstrip(b"\0") == INSPECT_METADATA:
            if not 0 <= d[6] <= MAX_METADATA:
                return None
            with open(path, "rb") as f:
                f.seek(d[5])
                return f.read(d[6]).decode("utf-8", errors="replace")
    return None
