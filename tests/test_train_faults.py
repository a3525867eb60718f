"""A dead or stuck rank fails the job in bounded time: no hang.

The ddp ranks run without a supervising launcher (torchrun's environment, no
agent), so what the surviving rank does is the trainer's own doing: gloo
reports the closed connection at once (SIGKILL), or the collective times out
after ``dist.timeout_s`` (SIGSTOP: the peer is alive but silent). Horovod's
MPI path has no timeout of its own: the trainer's watchdog ends the
surviving rank, and mpirun then ends the job.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_support import (
    MPIRUN,
    PY,
    TINY,
    TRAIN,
    Ranks,
    deep_update,
    env,
    free_port,
    torchrun_env,
    wait_for_record,
    write_config,
)

TIMEOUT_S = 5
GRACE_S = 20
#: Long enough that nobody finishes while we watch.
CFG = deep_update(
    TINY, {"train": {"epochs": 50}, "dist": {"timeout_s": TIMEOUT_S}, "data": {"num_samples": 2048}}
)


def _after_step(n: int):
    return lambda r: r["kind"] == "step" and r["global_step"] >= n


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_ddp_survivor_exits_nonzero_within_timeout(tmp_path: Path, sig: signal.Signals) -> None:
    config = write_config(tmp_path / "run.yaml", CFG)
    out = tmp_path / "run"
    ranks = Ranks(
        [*TRAIN, "--config", str(config), "--out", str(out)], torchrun_env(free_port()), tmp_path
    )
    try:
        wait_for_record(out / "metrics.jsonl", _after_step(3), timeout=90, procs=ranks)
        ranks.procs[1].send_signal(sig)
        t0 = time.monotonic()
        code = ranks.wait_one(0, TIMEOUT_S + GRACE_S)
        elapsed = time.monotonic() - t0
    finally:
        ranks.kill_all()
    assert code is not None, "the surviving rank hung:\n" + ranks.log(0)
    assert code != 0, ranks.log(0)
    if sig == signal.SIGSTOP:  # nothing but the configured timeout can have ended it
        assert elapsed >= TIMEOUT_S * 0.8, ranks.log(0)
        assert re.search(r"(?i)timed out|timeout|no progress", ranks.log(0)), ranks.log(0)
    assert not (out / "summary.json").exists()


def test_horovod_stuck_peer_under_mpirun(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", deep_update(CFG, {"dist": {"backend": "horovod"}}))
    out = tmp_path / "run"
    log_path = tmp_path / "mpirun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*MPIRUN, PY, *TRAIN, "--config", str(config), "--out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
            start_new_session=True,
        )
    code = None
    try:
        wait_for_record(out / "metrics.jsonl", _after_step(3), timeout=90)
        os.kill(_rank_pid(proc.pid, rank=1), signal.SIGSTOP)
        t0 = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(timeout=TIMEOUT_S + GRACE_S)
        elapsed = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank too
        proc.wait(timeout=10)
    text = log_path.read_text()
    assert code is not None, "mpirun hung:\n" + text[-3000:]
    assert code != 0 and elapsed < TIMEOUT_S + GRACE_S
    assert "rank 0: no progress for" in text, text[-3000:]


def _rank_pid(root: int, rank: int) -> int:
    """The pid of MPI rank ``rank`` among the descendants of ``root``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in _descendants(root):
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                    return pid
        time.sleep(0.1)
    raise AssertionError(f"no MPI rank {rank} under pid {root}")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
