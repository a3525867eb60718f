"""Helpers for the trainer tests (not collected: no test_ prefix).

Processes are real: ``torch.distributed.run`` (torchrun), the venv's
``mpirun``, or two plain processes given the environment that ``srun`` or
torchrun would give them. Every wait is bounded by a timeout, and every
process group is killed at the end, so a failing test cannot hang the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PY = sys.executable
VENV_BIN = str(Path(sys.executable).parent)
MPIRUN = [str(Path(VENV_BIN) / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
TRAIN = ["-m", "scalelab", "train"]

#: A tiny, fast config: no batch-norm (exact N-rank = 1-rank), 1 thread per rank.
TINY: dict[str, Any] = {
    "seed": 7,
    "model": {"name": "cnn", "options": {"width": 8, "hidden": 32}},
    "data": {
        "source": "synthetic",
        "num_samples": 256,
        "val_samples": 64,
        "image_shape": [3, 16, 16],
        "num_classes": 4,
    },
    "optim": {
        "global_batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "warmup_epochs": 0.5,
    },
    "train": {"epochs": 1, "threads": 1, "progress": False},
    "metrics": {"warmup_steps": 1},
}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test environment: venv first on PATH, one thread, no inherited launcher vars."""
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_", "SLURM_", "PMI_", "HOROVOD_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e.update(extra or {})
    return e


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(
    cmd: list[str], timeout: float = 120, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(extra_env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} did not finish in {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc


class Ranks:
    """Two rank processes started directly with a launcher's environment (srun/torchrun style).

    No supervising launcher: what one rank does when its peer dies or hangs is
    exactly what the test observes.
    """

    def __init__(
        self, args: list[str], rank_env: Callable[[int], dict[str, str]], log_dir: Path
    ) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs = [log_dir / f"rank{r}.log" for r in range(2)]
        for r in range(2):
            with open(self.logs[r], "w") as fh:
                self.procs.append(
                    subprocess.Popen(
                        [PY, *args],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env(rank_env(r)),
                        start_new_session=True,
                    )
                )

    def wait(self, timeout: float) -> list[int | None]:
        """Exit codes (None: still running at the deadline)."""
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def wait_one(self, r: int, timeout: float) -> int | None:
        """Exit code of rank ``r`` (None: still running after ``timeout``)."""
        try:
            return self.procs[r].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log(self, r: int) -> str:
        return self.logs[r].read_text()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def slurm_env(job_id: int) -> Callable[[int], dict[str, str]]:
    """What ``srun -n 2`` on one node sets (the variables scalelab.layout reads)."""

    def rank_env(r: int) -> dict[str, str]:
        return {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": str(r),
            "SLURM_LOCALID": str(r),
            "SLURM_NODEID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "2",
        }

    return rank_env


def torchrun_env(port: int) -> Callable[[int], dict[str, str]]:
    """torchrun's worker variables, without the torchrun agent."""

    def rank_env(r: int) -> dict[str, str]:
        return {
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }

    return rank_env


def wait_for_record(
    metrics: Path,
    match: Callable[[dict[str, Any]], bool],
    timeout: float,
    procs: Ranks | None = None,
) -> dict[str, Any]:
    """Poll metrics.jsonl until a record satisfies ``match``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if match(rec):
                    return rec
        if procs is not None and any(p.poll() is not None for p in procs.procs):
            raise AssertionError("a rank exited early:\n" + procs.log(0) + procs.log(1))
        time.sleep(0.01)
    raise AssertionError(f"no matching record in {metrics} within {timeout} s")


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(run_dir: Path) -> dict[str, Any]:
    import torch

    return torch.load(run_dir / "model.pt", weights_only=True)


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
