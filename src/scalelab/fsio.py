"""Atomic writes and file reads and hashes: the lowest layer every writer uses.

A reader sees the old file (or directory) or the complete new one, never half: write to
a temp sibling, flush, fsync, ``os.replace``, fsync the directory so the rename survives
a crash. New files get the mode the umask allows (0666 & ~umask), like ``open()`` would:
``mkstemp`` alone leaves 0600. What a command may replace, and the one-writer lock, live
in :mod:`scalelab.output_guard`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from scalelab.errors import UsageError, environment_cause


def umask() -> int:
    """The process umask, read without changing it where Linux allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


#: read size for hashing: large enough that multi-GB shards hash at disk speed
_HASH_CHUNK = 8 << 20


def sized_sha256(
    path: str | Path, on_bytes: Callable[[int], None] | None = None
) -> tuple[int, str]:
    """(bytes hashed, hex sha256) of a file, streamed in large chunks.

    The size is the count of bytes that went into the digest, not a separate
    ``stat``, so the pair cannot disagree. ``on_bytes`` gets each chunk's length
    so callers can drive a progress bar while hashing multi-GB shards.
    """
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return size, digest.hexdigest()


def sha256_file(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's bytes: the one file digest every scalelab module uses."""
    return sized_sha256(path, on_bytes)[1]


def canonical(obj: Any) -> bytes:
    """The bytes hashed for a JSON value: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_text(path: str | Path, what: str = "file") -> str:
    """Read UTF-8 text; a missing, unreadable or non-UTF-8 file is a one-line UsageError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {path}: not UTF-8 text (byte {exc.start}: "
            f"{exc.object[exc.start : exc.start + 1]!r})"
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory, expected a file") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = environment_cause(exc)
        if cause is not None and cause.filename is None:
            # A full disk hit inside a writer (torch.save, pandas) names no file: name it.
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> None:
    """Call ``writer(fh)`` on a temp file, then move it over ``path``."""
    with atomic_open(path) as fh:
        writer(fh)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
