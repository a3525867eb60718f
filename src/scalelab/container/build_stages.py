"""Run the build's stages: one build per cache, logged commands, user namespaces, sandboxes.

Both images (``build.py``, ``build_gpu.py``) are a chain of Apptainer definitions; what a
stage is (how it is invoked, cached, logged and timed) lives here once, in :class:`Stages`,
and each image only names its definitions, inputs and build arguments.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.container import runtime
from scalelab.errors import UsageError

USERNS_MAP = ["--map-users=0,0,65536", "--map-groups=0,0,65536"]
STAGE_OK = ".scalelab-stage-ok"


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One build at a time per cache (a second waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def clean_env() -> dict[str, str]:
    """The builder's environment without the host's pip settings (they must not reach the image)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def run_logged(argv: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run ``argv`` with its output appended to ``log``; on failure show the log's tail and
    raise one line naming the step and the log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise UsageError(f"{what} failed (exit {proc.returncode}); full log: {log}")


def staged_prefix(rt: runtime.Runtime) -> list[str]:
    """The prefix that runs a %post stage: a user namespace as root, --fakeroot as a user."""
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if not unshare:
            raise UsageError("unshare (util-linux) not found: needed to build as root")
        return [unshare, "--user", *USERNS_MAP, "--mount", rt.path, "build"]
    return [rt.path, "build", "--fakeroot"]


def _empty_dev(sandbox: Path) -> None:
    """Device nodes of a sandbox cannot be copied inside a user namespace; apptainer makes /dev."""
    dev = sandbox / "dev"
    if dev.is_dir():
        for entry in dev.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _build_args(args: Mapping[str, object]) -> list[str]:
    return [x for k, v in args.items() for x in ("--build-arg", f"{k}={v}")]


def pip_sdist(lock: Path, dest: Path, log: Path, *, pypi_only: bool = False) -> None:
    """Fetch the sdists a hashed lock names (Horovod's), checked against their sha256;
    ``pypi_only``: without the host's pip configuration (no local find-links or indexes)."""
    argv = [sys.executable, "-m", "pip", *(["--isolated"] if pypi_only else [])]
    argv += ["download", "--quiet", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
    env = clean_env() if pypi_only else None
    run_logged([*argv, "--dest", str(dest), "-r", str(lock)], log, "pip download (sdist)", env=env)


def scalelab_wheel(repo: Path, dest: Path, log: Path) -> Path:
    """scalelab's own wheel, built from the checkout (the image's thin last stage)."""
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    run_logged([*argv, "--wheel-dir", str(dest), str(repo)], log, "pip wheel (scalelab)")
    wheels = sorted(dest.glob("scalelab-*.whl"))
    if not wheels:
        raise UsageError(f"no scalelab wheel in {dest}")
    return wheels[0]


@dataclass
class Stages:
    """One image build's stages: the runtime, the log, what to say, and each stage's time."""

    rt: runtime.Runtime
    log: Path
    say: Callable[[str], None] = print
    times: dict[str, float] = field(default_factory=dict)

    def sandbox(self, name: str, final: Path, argv_of: Callable[[Path], list[str]]) -> None:
        """Build a sandbox stage into ``final`` atomically (a failed build leaves no cache
        entry); a finished one is reused."""
        if final.is_dir() and (final / STAGE_OK).is_file():
            self.say(f"{name}: cached ({final})")
            return
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        t0 = time.monotonic()
        self.say(f"{name}: building ...")
        run_logged(argv_of(tmp), self.log, f"stage {name}", env=clean_env())
        _empty_dev(tmp)
        (tmp / STAGE_OK).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self.times[name] = round(time.monotonic() - t0, 1)
        self.say(f"{name}: built in {self.times[name]} s")

    def base(self, final: Path, definition: Path, mirror: str) -> None:
        """The debootstrap base: real root as root (debootstrap needs it), --fakeroot as a user."""
        build = (
            [self.rt.path, "build"] if os.geteuid() == 0 else [self.rt.path, "build", "--fakeroot"]
        )
        args = _build_args({"mirror": mirror})
        self.sandbox(
            "base", final, lambda out: [*build, "--sandbox", *args, str(out), str(definition)]
        )

    def on_top(
        self,
        name: str,
        final: Path,
        definition: Path,
        args: Mapping[str, object],
        binds: Mapping[Path, str] | None = None,
    ) -> None:
        """A %post stage on top of an earlier one, host directories bound read-only."""
        bind = [x for src, dst in (binds or {}).items() for x in ("--bind", f"{src}:{dst}:ro")]
        extra = [*bind, *_build_args(args)]
        self.sandbox(
            name,
            final,
            lambda out: [*staged_prefix(self.rt), "--sandbox", *extra, str(out), str(definition)],
        )

    def sif(
        self,
        name: str,
        out: Path,
        definition: Path,
        args: Mapping[str, object],
        *,
        notest: bool,
        mksquashfs_args: str,
    ) -> None:
        """The last stage, squashed to a SIF at ``out`` (its %test runs unless ``notest``)."""
        t0 = time.monotonic()
        argv = [*staged_prefix(self.rt), "--force", *(["--notest"] if notest else [])]
        argv += ["--mksquashfs-args", mksquashfs_args, *_build_args(args)]
        run_logged([*argv, str(out), str(definition)], self.log, f"stage {name}", env=clean_env())
        self.times[name] = round(time.monotonic() - t0, 1)


def keep_result(tmp: Path, cached: Path, *, notest: bool, stale: str) -> Path:
    """Move the built SIF into the cache (or beside it, ``-notest``, never cached) and drop
    the older SIFs ``stale`` matches beside it: one image per cached stack."""
    if notest:
        out = cached.with_name(cached.stem + "-notest.sif")
        tmp.rename(out)
        return out
    tmp.rename(cached)
    for old in cached.parent.glob(stale):
        if old != cached:
            old.unlink(missing_ok=True)
    return cached
