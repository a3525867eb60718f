"""Job-start step: put a staged dataset on node-local scratch, once per node.

Reading shards from node-local disk takes the load off the shared filesystem
while every rank of every node reads at once. Every rank (or one task per
node under ``srun``) may call ``localize``: a file lock makes one of them copy
while the others wait, and a completion marker (the last thing written, then
an atomic rename) lets later callers reuse the verified copy. When scratch is
too small the shared copy is used with a warning, so the job still runs.

Scratch is the first of: the ``scratch`` argument, ``$SCALELAB_SCRATCH``,
``$SLURM_TMPDIR``, ``$TMPDIR``, ``/tmp``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scalelab.data.manifest import (
    MANIFEST_NAME,
    FileEntry,
    fsync_dir,
    load_manifest,
    write_bytes_synced,
)
from scalelab.data.progress import Progress
from scalelab.data.shards import LOCAL_MARKER
from scalelab.errors import DataError, UsageError
from scalelab.fsio import sha256_file, sized_sha256

log = logging.getLogger(__name__)

SCRATCH_ENV = ("SCALELAB_SCRATCH", "SLURM_TMPDIR", "TMPDIR")
#: keep this much free on scratch after the copy (other jobs, checkpoints, logs)
DEFAULT_RESERVE_BYTES = 1 << 30
DEFAULT_LOCK_TIMEOUT_S = 4 * 3600.0
SUBDIR = "scalelab-data"


@dataclass
class LocalizeResult:
    """Where to read from, and what was done to get there."""

    path: Path
    #: "copied", "reused", "in-place" or "fallback"
    action: str
    detail: str = ""


def scratch_root(scratch: str | Path | None = None) -> Path:
    """The node-local scratch directory (argument, then environment, then /tmp)."""
    if scratch:
        return Path(scratch)
    for var in SCRATCH_ENV:
        value = os.environ.get(var)
        if value:
            return Path(value)
    return Path("/tmp")


def local_target(data_dir: str | Path, scratch: str | Path | None = None) -> tuple[Path, Path]:
    """The copy's directory and its lock file for ``data_dir``.

    Named after the dataset and its manifest's hash: a re-staged dataset gets a
    new copy, and jobs on the same node share the same one.
    """
    data_dir = Path(data_dir)
    digest = sha256_file(data_dir / MANIFEST_NAME)
    base = scratch_root(scratch) / SUBDIR
    key = f"{data_dir.resolve().name}-{digest[:16]}"
    return base / key, base / f"{key}.lock"


def localize(
    data_dir: str | Path,
    scratch: str | Path | None = None,
    *,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    progress: bool | None = None,
) -> Path:
    """Return the directory to read ``data_dir`` from on this node (see module doc)."""
    return localize_report(
        data_dir, scratch, reserve_bytes=reserve_bytes, lock_timeout=lock_timeout, progress=progress
    ).path


def localize_report(
    data_dir: str | Path,
    scratch: str | Path | None = None,
    *,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    progress: bool | None = None,
) -> LocalizeResult:
    """``localize`` with the action taken, for logs and tests."""
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir}: no such dataset directory")
    manifest = load_manifest(data_dir)
    root = scratch_root(scratch)
    if _is_within(data_dir, root):
        msg = f"{data_dir} is already on node-local scratch {root}; using it in place"
        log.info(msg)
        return LocalizeResult(data_dir, "in-place", msg)
    try:
        (root / SUBDIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fallback(data_dir, f"cannot create {root / SUBDIR} ({exc.strerror})")
    target, lock_path = local_target(data_dir, root)
    manifest_sha = sha256_file(data_dir / MANIFEST_NAME)
    if _complete(target, manifest_sha):
        return _reused(target)
    with node_lock(lock_path, lock_timeout):
        if _complete(target, manifest_sha):  # another rank finished while we waited
            return _reused(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # safe: only lock holders make these
        if target.exists():
            log.warning("%s: incomplete or changed node-local copy; copying again", target)
            _remove(target)
        need = sum(e.size for e in manifest.values()) + (data_dir / MANIFEST_NAME).stat().st_size
        free = shutil.disk_usage(target.parent).free
        if free - need < reserve_bytes:
            return _fallback(
                data_dir,
                f"scratch {root} has {_gib(free)} free; the dataset needs {_gib(need)} "
                f"plus a reserve of {_gib(reserve_bytes)}",
            )
        try:
            seconds = _copy(data_dir, target, manifest, manifest_sha, need, progress)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return _fallback(data_dir, f"scratch {root} filled up during the copy")
            raise
    msg = (
        f"copied {len(manifest) + 1} files ({need / 1e6:.1f} MB) from {data_dir} to {target} "
        f"in {seconds:.2f} s ({need / 1e6 / max(seconds, 1e-9):.0f} MB/s), checksums verified"
    )
    log.info(msg)
    return LocalizeResult(target, "copied", msg)


def _copy(
    data_dir: Path,
    target: Path,
    manifest: dict[str, FileEntry],
    manifest_sha: str,
    need: int,
    progress: bool | None,
) -> float:
    """Copy into a temporary sibling, verify every file, add the marker, rename."""
    t0 = time.perf_counter()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        with Progress(
            f"copying {data_dir.name} to node-local scratch", need, "bytes", progress
        ) as bar:
            for entry in sorted(manifest.values(), key=lambda e: e.path):
                src, dst = data_dir / entry.path, tmp / entry.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                size, digest = sized_sha256(dst)
                if (size, digest) != (entry.size, entry.sha256):
                    raise DataError(
                        f"{src}: copy at {dst} does not match {MANIFEST_NAME} "
                        f"(size {size} vs {entry.size}, sha256 {digest[:16]}... vs "
                        f"{entry.sha256[:16]}...); run 'scalelab data verify {data_dir}'"
                    )
                bar.advance(size)
            shutil.copyfile(data_dir / MANIFEST_NAME, tmp / MANIFEST_NAME)
            if sha256_file(tmp / MANIFEST_NAME) != manifest_sha:
                raise DataError(f"{data_dir / MANIFEST_NAME}: changed while it was being copied")
        stats = {}
        for entry in manifest.values():
            st = (tmp / entry.path).stat()
            stats[entry.path] = [st.st_size, st.st_mtime_ns]
        marker = {
            "format": "scalelab-local",
            "source": str(data_dir),
            "manifest_sha256": manifest_sha,
            "host": socket.gethostname(),
            "files": stats,
        }
        for d in sorted({(tmp / e.path).parent for e in manifest.values()}):
            fsync_dir(d)
        write_bytes_synced(tmp / LOCAL_MARKER, (json.dumps(marker, indent=1) + "\n").encode())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - t0


def _complete(target: Path, manifest_sha: str) -> bool:
    """A finished copy of this very manifest whose files still have their sizes and mtimes."""
    try:
        marker = json.loads((target / LOCAL_MARKER).read_text())
        if marker.get("manifest_sha256") != manifest_sha:
            return False
        for rel, (size, mtime_ns) in marker["files"].items():
            st = (target / rel).stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                return False
        return sha256_file(target / MANIFEST_NAME) == manifest_sha
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def node_lock(lock_path: Path, timeout: float) -> Iterator[None]:
    """Exclusive flock on ``lock_path``: one copier per node (released if the holder dies)."""
    deadline = time.monotonic() + timeout
    waiting = False
    with open(lock_path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    log.info("waiting for %s: another process on this node is copying", lock_path)
                if time.monotonic() > deadline:
                    raise DataError(
                        f"{lock_path}: still locked after {timeout:.0f} s by another copy "
                        "on this node"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _reused(target: Path) -> LocalizeResult:
    msg = f"reusing the verified node-local copy {target}"
    log.info(msg)
    return LocalizeResult(target, "reused", msg)


def _fallback(data_dir: Path, why: str) -> LocalizeResult:
    msg = f"{why}; reading from the shared copy {data_dir}"
    log.warning("warning: %s", msg)
    return LocalizeResult(data_dir, "fallback", msg)


def _remove(path: Path) -> None:
    trash = path.parent / f".{path.name}.tmp-trash-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
