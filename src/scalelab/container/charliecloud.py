"""Charliecloud as a second runtime: the directory image derived from the verified SIF.

The SIF stays the one artifact that is pinned (sha256) and signature-checked; Charliecloud
runs a directory derived from it, once per sha256, beside the SIF:
``sha256-<hex>.ch/``. It is unpacked into a hidden ``.sha256-<hex>.ch.partial-*`` sibling
and renamed into place only when complete (a rename of a directory is atomic), so a
half-unpacked tree never carries the ready name; a present tree is reused, a missing one
derived again. Why a directory and not the SIF's SquashFS (``ch-run`` 0.31 mounts one
with its built-in squashfuse): ``ch-run`` cannot create bind mount points in a read-only
image, and the ranks bind the run's own paths (data, scratch, working directory), so the
mount points are made in the directory (:func:`mount_points`); ``ch-fromhost --nvidia``
also needs a directory.

Podman runs the same tree (``podman run --rootfs``, :mod:`scalelab.container.podman`): one
derivation for both runtimes, the image's environment evaluated by whichever derives it
(``enter``: the argument list that runs a command in the tree with only PATH set).

The image's environment (Apptainer's ``%environment``, kept in the SIF as
``/.singularity.d/env/90-environment.sh``) is evaluated once inside the fresh tree and
written to ``/ch/environment``, which ``ch-run --set-env`` reads: the image's PATH and
LD_LIBRARY_PATH, not the host's.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from scalelab.container import sif
from scalelab.errors import UsageError

UNSQUASHFS = "unsquashfs"
#: Where ``ch-run --set-env`` (without a file) reads the image's variables.
ENV_FILE = Path("ch") / "environment"
#: Apptainer's environment scripts a recipe's ``%environment`` (or a Docker ENV) became.
ENV_SCRIPTS = (
    "/.singularity.d/env/10-docker2singularity.sh",
    "/.singularity.d/env/90-environment.sh",
)
#: The PATH the image's scripts start from (Apptainer's own default inside an image).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Set by the shell or the runtime itself (ch-run; podman, whose HOSTNAME differs in each
#: container), not by the image.
_NOT_THE_IMAGES = {"_", "PWD", "OLDPWD", "SHLVL", "CH_RUNNING", "HOSTNAME", "container"}
_TIMEOUT_S = 1800
#: A partial tree older than this is an unpack that died (an unpack takes under a minute
#: here, and ``_TIMEOUT_S`` bounds a live one): the next derivation removes it.
STALE_PARTIAL_S = 6 * 3600


def image_dir(sif_path: str | Path, sha256: str) -> Path:
    """The Charliecloud image derived from the SIF of this sha256: beside the SIF."""
    return Path(sif_path).resolve().parent / f"sha256-{sha256}.ch"


def ch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start ch-run in: it refuses to run without $USER (measured,
    0.31: "error: $USER not set"), which a root shell in CI may lack."""
    env = dict(os.environ if environ is None else environ)
    if "USER" not in env:
        env["USER"] = pwd.getpwuid(os.getuid()).pw_name
    return env


#: How a runtime runs a command inside a tree with only PATH set: the argv before it.
Enter = Callable[[Path], list[str]]


def ch_enter(ch_run: str) -> Enter:
    """ch-run's way into a tree: every host variable unset, PATH the image's default."""
    return lambda tree: [ch_run, "--unset-env=*", f"--set-env=PATH={BASE_PATH}", str(tree), "--"]


def derive(sif_path: str | Path, sha256: str, ch_run: str | Enter) -> Path:
    """The ready image directory of an already verified SIF, unpacked now if missing.
    ``ch_run``: ch-run's path, or the :data:`Enter` of the runtime that derives it.

    The caller has checked the SIF's sha256 (and signature): nothing here trusts a file
    that was not. Concurrent derivations each unpack their own partial tree; the first
    rename wins and the others discard theirs.
    """
    final = image_dir(sif_path, sha256)
    if final.is_dir():
        return final
    tool = shutil.which(UNSQUASHFS)
    if tool is None:
        raise UsageError(
            "container.runtime: charliecloud needs unsquashfs (Debian: squashfs-tools) "
            "to derive its image from the SIF"
        )
    part = sif.primary_partition(sif_path)
    remove_stale_partials(final)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _unpack(tool, sif_path, part.offset, tmp)
        write_environment(tmp, ch_enter(ch_run) if isinstance(ch_run, str) else ch_run)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        remove_tree(tmp)
    return final


def remove_stale_partials(final: Path, max_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the partial trees of ``final`` that no live unpack can own (older than
    ``max_age_s``: a killed unpack leaves one, gigabytes on the shared filesystem).
    Younger ones may belong to an unpack running on another node, and stay."""
    now = time.time()
    stale = [
        p
        for p in final.parent.glob(f".{final.name}.partial-*")
        if now - p.lstat().st_mtime > max_age_s
    ]
    for p in stale:
        remove_tree(p)
    return stale


def _unpack(tool: str, sif_path: str | Path, offset: int, dest: Path) -> None:
    """unsquashfs the SIF's partition at ``offset`` into ``dest`` (which must not exist)."""
    argv = [tool, "-q", "-n", "-no-xattrs", "-o", str(offset), "-d", str(dest), str(sif_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise UsageError(
            f"unsquashfs of {sif_path} failed: {last[-1] if last else proc.returncode}"
        )


def _image_env(tree: Path, enter: Enter, scripts: Iterable[str]) -> dict[str, str]:
    """The variables a clean shell has inside ``tree`` after sourcing ``scripts``."""
    body = 'for f in "$@"; do if [ -r "$f" ]; then . "$f"; fi; done; exec /usr/bin/env -0'
    argv = [*enter(tree), "/bin/sh", "-c", body, "sh", *scripts]
    proc = subprocess.run(argv, capture_output=True, env=ch_env(), timeout=120, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(
            f"{Path(argv[0]).name} could not read the image's environment: "
            f"{err[-1:] or proc.returncode}"
        )
    pairs = (item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k not in _NOT_THE_IMAGES}


def write_environment(tree: Path, enter: Enter) -> dict[str, str]:
    """Write the image's own variables (those its scripts set or change) to /ch/environment
    (a KEY=VALUE file that ``ch-run --set-env`` and ``podman run --env-file`` both read)."""
    base = _image_env(tree, enter, ())
    image = _image_env(tree, enter, ENV_SCRIPTS)
    own = {k: v for k, v in image.items() if base.get(k) != v}
    bad = sorted(k for k, v in own.items() if "\n" in v)
    if bad:
        raise UsageError(f"the image's variable {bad[0]} holds a newline: /ch/environment cannot")
    target = tree / ENV_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"{k}={v}\n" for k, v in own.items()))
    return own


def mount_points(tree: Path, binds: Iterable[tuple[str, str]]) -> None:
    """Create each bind's destination in the image (ch-run 0.31 cannot in a read-only one):
    a directory, or an empty file for a file source. A destination whose path crosses a
    symlink of the image is refused: it could resolve outside the tree."""
    for src, dst in binds:
        target = tree / dst.lstrip("/")
        _no_symlink_on_the_way(tree, target, dst)
        if target.exists():
            continue
        if Path(src).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)


def _no_symlink_on_the_way(tree: Path, target: Path, dst: str) -> None:
    here = tree
    for part in target.relative_to(tree).parts:
        here = here / part
        if here.is_symlink():
            raise UsageError(
                f"container.binds: destination {dst} crosses the image's symlink "
                f"/{here.relative_to(tree)}: bind it to the path the link names"
            )


def remove_tree(path: Path) -> None:
    """Remove a (partial) tree, making its read-only directories writable first."""
    if not path.exists() and not path.is_symlink():
        return

    def _writable(func, p, _exc) -> None:  # noqa: ANN001 - shutil's onerror signature
        parent = os.path.dirname(p)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(p)

    shutil.rmtree(path, onerror=_writable)
