"""Run the build's stages: one build per cache, logged commands, user namespaces, sandboxes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from scalelab.container import runtime
from scalelab.container.build_plan import Plan
from scalelab.errors import UsageError

USERNS_MAP = ["--map-users=0,0,65536", "--map-groups=0,0,65536"]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build at a time per cache (a second waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _clean_env() -> dict[str, str]:
    """The builder's environment without the host's pip settings (they must not reach the image)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def _run(argv: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise UsageError(f"{what} failed (exit {proc.returncode}); full log: {log}")


def _staged(rt: runtime.Runtime) -> list[str]:
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


def _stage(p: Plan, name: str, final: Path, argv_of, log: Path, say) -> None:
    """Build a sandbox stage into final (atomically: a failed build leaves no cache entry)."""
    if final.is_dir() and (final / ".scalelab-stage-ok").is_file():
        say(f"{name}: cached ({final})")
        return
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.monotonic()
    say(f"{name}: building ...")
    _run(argv_of(tmp), log, f"stage {name}", env=_clean_env())
    _empty_dev(tmp)
    (tmp / ".scalelab-stage-ok").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    p.times[name] = round(time.monotonic() - t0, 1)
    say(f"{name}: built in {p.times[name]} s")
