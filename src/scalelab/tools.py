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


def pid_alive(pid: int) -> bool:
    """Whether a process exists (signal 0; one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
