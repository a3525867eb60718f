"""The output guard: what a command may replace (markers) and one writer at a time (locks).

Two promises every scalelab output command keeps through this module:

* **Nothing it did not create.** Every output command goes through one guard,
  :func:`guard`: an existing output directory is replaced only when it carries
  scalelab's marker (:data:`MARKER`) for the same kind of output and holds nothing
  but what that marker says scalelab wrote, or is empty; an existing file only when
  the command recognises it as its own earlier output. A target that is, or
  contains, one of the command's inputs is refused. So ``analyze RUN --out RUN``,
  ``--out ~/thesis`` or a note left in a run directory loses nothing, ``--force``
  included.
* **One writer.** A writer holds an exclusive ``flock`` on ``.<name>.lock`` beside
  the target for the whole write, not a check-then-write: a second writer is
  refused at once with the holder's pid and host. The kernel drops the lock when
  its holder dies; the lock file then names a dead writer: that stale lock is
  reported, and taken over only where its death is provable (same host, pid gone)
  or with ``force``.

Writes themselves are atomic through :mod:`scalelab.fsio`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from scalelab import __version__
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_json, fsync_dir, umask
from scalelab.tools import pid_alive

#: File that marks a directory as a scalelab output of one kind ("analysis", "run", ...).
MARKER = ".scalelab-output.json"


# ---- what a command may replace ------------------------------------------------------------

#: Files a workflow engine leaves in an output directory: never a user's data.
ENGINE_FILES = frozenset({".snakemake_timestamp"})


def _marker(directory: str | Path) -> dict[str, Any]:
    """The marker document of ``directory`` ({} when it has none or it is unreadable)."""
    try:
        doc = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def marker_kind(directory: str | Path) -> str | None:
    """The kind of scalelab output ``directory`` holds, or None when it carries no marker."""
    kind = _marker(directory).get("kind")
    return kind if isinstance(kind, str) else None


def write_marker(directory: str | Path, kind: str, owns: Iterable[str] | None = None) -> None:
    """Mark ``directory`` as scalelab output of ``kind`` and record what scalelab wrote.

    ``owns`` lists the relative paths the command writes there (``"dir/"`` owns
    everything below ``dir``), for a directory filled while it runs (a run); None
    records the directory's files now, for one written whole (see :func:`atomic_dir`).
    The guard later replaces the directory only if it holds nothing else.
    """

    directory = Path(directory)
    names = _files(directory) if owns is None else set(owns)
    atomic_write_json(
        directory / MARKER,
        {
            "kind": kind,
            "scalelab": __version__,
            "command": _command_name(),
            "owns": sorted(names - {MARKER}),
        },
    )


def _files(directory: Path) -> set[str]:
    """Relative paths of every file (and symlink) under ``directory``."""
    return {
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_symlink() or not p.is_dir()
    }


def foreign_files(directory: str | Path) -> list[str]:
    """Files under a marked ``directory`` that its marker does not say scalelab wrote."""
    directory = Path(directory)
    owns = _marker(directory).get("owns")
    owned = {str(o) for o in owns} if isinstance(owns, list) else set()
    prefixes = tuple(o for o in owned if o.endswith("/"))
    return sorted(
        rel
        for rel in _files(directory)
        if rel != MARKER
        and rel not in owned
        and not rel.startswith(prefixes)
        and Path(rel).name not in ENGINE_FILES
    )


def _command_name() -> str:
    return " ".join(Path(sys.argv[0]).name.split()[:1] + sys.argv[1:2]) if sys.argv else "?"


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_target(
    target: str | Path, kind: str, inputs: Iterable[str | Path] = (), *, what: str = "--out"
) -> Path:
    """Refuse a target this command may not replace; return it absolute.

    Allowed: a path that does not exist, an empty directory, or a directory marked
    as scalelab output of the same ``kind`` that holds only what its marker says
    scalelab wrote. Refused: a file, a foreign directory, a directory of another kind,
    a marked one holding anything else (a user's notes), and any target that is or
    contains an input. Commands call it through :func:`guard`.
    """
    path = Path(os.path.abspath(target))
    real = _resolved(path)
    for item in inputs:
        inp = _resolved(item)
        if real == inp or real in inp.parents:
            raise UsageError(
                f"{what} {target}: overlaps the input {item}; write the output somewhere else"
            )
    if not (path.exists() or path.is_symlink()):
        return path
    if path.is_symlink() or not path.is_dir():
        raise UsageError(f"{what} {target}: exists and is not a directory; refusing to replace it")
    found = marker_kind(path)
    if found == kind:
        foreign = foreign_files(path)
        if foreign and "owns" not in _marker(path):
            raise UsageError(
                f"{what} {target}: its marker (an older scalelab) does not "
                "record what scalelab wrote there; refusing to replace it: "
                "delete it yourself or choose a new path"
            )
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise UsageError(
                f"{what} {target}: holds {foreign[0]}{more}, which scalelab did "
                "not write; refusing to replace it: move it away or choose "
                "a new path"
            )
        return path
    if found is not None:
        raise UsageError(
            f"{what} {target}: holds scalelab {found} output, not {kind}; refusing to replace it"
        )
    if _holds_files(path):
        busy = _live_holder(path)
        if busy is not None and not _is_me(busy):  # a writer is creating it right now
            raise UsageError(
                f"{what} {target}: another writer holds its lock, "
                f"{_holder_text(busy)}; wait for it or stop it"
            )
        raise UsageError(
            f"{what} {target}: existing directory is not scalelab {kind} output "
            f"(no {MARKER}); refusing to replace it: choose a new path"
        )
    return path


def _holds_files(path: Path) -> bool:
    """Whether anything but empty directories lies under ``path``. Snakemake creates the
    parents of a job's outputs (e.g. results/analysis/plots/) before the job runs: such a
    skeleton holds nothing to lose."""
    return any(not p.is_dir() or p.is_symlink() for p in path.rglob("*"))


def check_file_target(
    target: str | Path,
    inputs: Iterable[str | Path] = (),
    is_ours: Callable[[Path], bool] | None = None,
    *,
    what: str = "--out",
) -> Path:
    """Like :func:`check_target` for a single output file: an existing file is replaced
    only when ``is_ours(path)`` recognises it as this command's earlier output."""
    path = Path(os.path.abspath(target))
    real = _resolved(path)
    for item in inputs:
        inp = _resolved(item)
        if real == inp or real in inp.parents:
            raise UsageError(f"{what} {target}: overlaps the input {item}")
    if path.is_dir():
        raise UsageError(f"{what} {target}: is a directory, expected a file path")
    if (path.exists() or path.is_symlink()) and not (
        is_ours and not path.is_symlink() and is_ours(path)
    ):
        raise UsageError(
            f"{what} {target}: exists and is not output of this command; refusing to replace it"
        )
    return path


@contextlib.contextmanager
def guard(
    target: str | Path,
    kind: str,
    inputs: Iterable[str | Path] = (),
    *,
    is_ours: Callable[[Path], bool] | None = None,
    force: bool = False,
    token: str | None = None,
    what: str = "--out",
) -> Iterator[Path]:
    """The one rule of every output command: check ``target``, lock it, check it again.

    A directory target must pass :func:`check_target` for ``kind``; a file target
    (``is_ours`` given) :func:`check_file_target`. The first check refuses before
    anything, even the lock file, is written; the second, under the writer lock,
    refuses what another process changed meanwhile. Yields the absolute target:
    the block may replace it, since it holds nothing that scalelab did not write.
    """
    inputs = list(inputs)

    def check() -> Path:
        if is_ours is not None:
            return check_file_target(target, inputs, is_ours, what=what)
        return check_target(target, kind, inputs, what=what)

    path = check()
    with writer_lock(path, force=force, token=token, what=what):
        yield check()


# ---- one writer at a time ------------------------------------------------------------------


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``: a hidden sibling, so it survives the target's replacement."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _holder(fh: IO[str]) -> dict[str, Any]:
    fh.seek(0)
    try:
        data = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _holder_text(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} "
        f"({info.get('command', '?')}, since {info.get('since', '?')})"
    )


def _provably_dead(info: dict[str, Any]) -> bool:

    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _open_locked(path: Path, what: str, target: str | Path) -> IO[str]:
    """Open ``path`` and take its flock; retry when the file was replaced meanwhile.

    The lock file is deleted on release, so a lock taken on a file that has just been
    unlinked would be a lock on nothing: after locking, the path must still name the
    very file locked (same inode), else open again.
    """
    for _ in range(20):
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - returned open
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_holder(fh))
            fh.close()
            raise UsageError(
                f"{what} {target}: another writer holds its lock, {holder}; wait for it or stop it"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()
    raise UsageError(
        f"{what} {target}: its lock file {path} keeps changing; another "
        "writer is starting and stopping"
    )


@contextlib.contextmanager
def writer_lock(
    target: str | Path, *, force: bool = False, token: str | None = None, what: str = "--out"
) -> Iterator[Path]:
    """Hold the exclusive writer lock of ``target`` for the block.

    A live holder: refused (UsageError naming it). The lock file is removed on release,
    so one that exists unlocked was left by a writer that died: that stale lock is
    reported on stderr and taken over when the holder is provably dead or ``force`` is
    given, otherwise refused. ``token`` is recorded so a child process can tell that
    the lock was taken on its behalf (see :func:`held_for`).
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = _open_locked(path, what, target)
    owned = False
    try:
        stale = _holder(fh)
        if stale:
            if not (force or _provably_dead(stale)):
                raise UsageError(
                    f"{what} {target}: stale lock {path} left by "
                    f"{_holder_text(stale)}, which cannot be checked from here; "
                    "rerun with --force to take it over"
                )
            print(
                f"scalelab: warning: {what} {target}: taking over the stale lock left by "
                f"{_holder_text(stale)}",
                file=sys.stderr,
                flush=True,
            )
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": _command_name(),
                    "token": token,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        )
        fh.flush()
        owned = True
        yield path
    finally:
        # Still locked while unlinking: nobody can take the old file in between. A lock
        # that was refused (live or stale holder) keeps its file and its evidence.
        if owned:
            with contextlib.suppress(OSError):
                path.unlink()
        fh.close()


def _is_me(info: dict[str, Any]) -> bool:
    return info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def _live_holder(target: str | Path) -> dict[str, Any] | None:
    """Who holds ``target``'s writer lock right now (None: nobody)."""
    try:
        with open(lock_path(target), encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(fh)
            return None
    except OSError:
        return None


def held_for(target: str | Path, token: str | None) -> bool:
    """Whether ``target``'s lock is held right now and was taken with ``token``."""
    if not token:
        return False
    try:
        with open(lock_path(target), encoding="utf-8") as fh:
            info = _holder(fh)
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return info.get("token") == token
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return False


@contextlib.contextmanager
def atomic_dir(
    target: str | Path, kind: str, inputs: Iterable[str | Path] = (), *, force: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block succeeds.

    ``target`` must pass :func:`guard` for ``kind`` (it may hold only an earlier
    output of the same kind), and the writer lock is held from the check to the
    rename. The temporary directory lives next to ``target`` (same filesystem, so the
    final step is a rename) and is marked with ``kind``; on any error it is removed and
    ``target`` is left as it was.
    """
    with guard(target, kind, inputs, force=force) as target:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            write_marker(tmp, kind)  # records every file written: all it may replace later
            os.chmod(tmp, 0o777 & ~umask())
            replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``; an old ``target`` goes only now."""
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)
