"""The external programs scalelab runs, and the processes it watches."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def env_bin_dir() -> Path:
    """The bin directory of the running Python's environment (the venv's mpirun lives there)."""
    return Path(sys.executable).parent


def which(name: str) -> str | None:
    """`shutil.which` on PATH, then in the running environment's bin directory.

    Users often call `.venv/bin/scalelab` without activating the venv; the
    Open MPI wheel's mpirun is then not on PATH but beside the interpreter.
    """
    found = shutil.which(name)
    if found:
        return found
    candidate = env_bin_dir() / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def mpirun_argv(ranks: int, cpus: int, not_found: str) -> list[str]:
    """``mpirun -n RANKS`` as scalelab starts local ranks: no core binding (each rank's
    data loading and threads share the node), root allowed, and oversubscribed when the
    ranks ask for more than the machine's ``cpus``-worth of cores.

    ``not_found``: the one-line UsageError when there is no mpirun.
    """
    from scalelab.errors import UsageError

    mpirun = which("mpirun")
    if not mpirun:
        raise UsageError(not_found)
    argv = [mpirun, "-n", str(ranks), "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if cpus > (os.cpu_count() or 1):
        argv.append("--oversubscribe")
    return argv


def pid_alive(pid: int) -> bool:
    """Whether a process exists (signal 0; one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
