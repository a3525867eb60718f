"""Processes of the test cluster: run a command, tell a live pid, read a log tail, stop pids."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from scalelab.testcluster.spec import ClusterError
from scalelab.tools import pid_alive


def _run(
    cmd: list[str], check: bool = True, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise ClusterError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def _alive(pid: int | None) -> bool:
    if not pid or not pid_alive(pid):
        return False
    # A zombie child of ours is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:]) or f"(empty log {path})"


def _pids_in_netns(ns: str) -> list[int]:
    try:
        target = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _terminate(pids: list[int | None], grace: float = 10) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left; reap our children."""
    pids = [p for p in dict.fromkeys(pids) if p and p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + (grace if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.1)
    if pids:
        raise ClusterError(f"processes {pids} survived SIGKILL")
