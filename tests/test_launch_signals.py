"""Signals follow the job: TERM/INT/USR1 to `scalelab launch` become the ranks' stop
protocol (checkpoint, exit), launch returns 75, no process outlives it, and the rerun
resumes to the same final weights as an uninterrupted run (issue 11).

Real processes throughout: `scalelab data stage`, then `scalelab launch` starting
`mpirun -n 2` or torchrun with 2 ranks, signalled from outside like Slurm would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import TINY, deep_update, env, ok, run, wait_for_record, weights

from scalelab import supervise

SCALELAB = [sys.executable, "-m", "scalelab"]
EXIT_REQUEUE = 75
#: 1 epoch of 40 steps of a few tens of ms: a signal at step 3 lands well inside the run.
RUN_CFG = deep_update(
    TINY,
    {
        "model": {"options": {"width": 32, "hidden": 128}},
        "optim": {"global_batch_size": 64},
        "train": {"epochs": 1, "deterministic": True},
        "metrics": {"warmup_steps": 1},
    },
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sig") / "data"
    ok(
        run(
            [
                *SCALELAB,
                "data",
                "stage",
                "--source",
                "synthetic",
                "--num-samples",
                "3200",
                "--image-size",
                "32",
                "32",
                "--num-classes",
                "4",
                "--seed",
                "2",
                "--quiet",
                "--out",
                str(out),
            ],
            timeout=300,
        )
    )
    return out


def spec(data: Path, local: str) -> str:
    point = {
        "backend": "ddp",
        "mode": "strong",
        "nodes": 1,
        "tasks_per_node": 2,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    run_cfg = deep_update(RUN_CFG, {"data": {"source": "staged", "path": str(data)}})
    run_cfg["data"] = {"source": "staged", "path": str(data)}
    return json.dumps(
        {
            "point": point,
            "run_config": run_cfg,
            "launch": {"local": local, "srun_mpi": "pmix", "cpus_per_task": 1, "timeout_s": 60},
        }
    )


def launch(data: Path, out: Path, local: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*SCALELAB, "launch", "--spec", spec(data, local), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        start_new_session=True,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the run directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{proc.name}: {cmd}")
    return found


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted run, shared by the signal tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = launch(data, out, "mpirun")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    return out


def child_pid(pid: int) -> int:
    """The (first) child process of ``pid``: the launcher that `scalelab launch` started."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    raise AssertionError(f"{pid} has no child")


@pytest.mark.parametrize(
    "local, sig, target",
    [
        ("mpirun", signal.SIGTERM, "launch"),
        ("mpirun", signal.SIGUSR1, "launch"),
        ("torchrun", signal.SIGTERM, "launch"),
        ("mpirun", signal.SIGUSR1, "mpirun"),
    ],
)
def test_signal_to_launch_checkpoints_exits_75_and_resumes(
    data, reference, tmp_path, local, sig, target
):
    out = tmp_path / "run"
    proc = launch(data, out, local)
    try:
        wait_for_record(
            out / "metrics.jsonl",
            lambda r: r.get("kind") == "step" and r.get("global_step", 0) >= 3,
            120,
        )
        # launch, as Slurm signals the batch script; or the launcher below it directly
        victim = proc.pid if target == "launch" else child_pid(proc.pid)
        os.kill(victim, sig)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, text
    time.sleep(0.5)
    assert processes_mentioning(str(out)) == [], "orphans outlived launch"
    assert supervise.stopped_after_checkpoint(out)
    assert not (out / "summary.json").exists()
    # The requeued job: the same command again resumes from the checkpoint.
    again = launch(data, out, local)
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in resumed)
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_stop_signal_per_launcher():
    assert supervise.stop_signal(["/x/bin/mpirun", "-n", "2"]) == signal.SIGUSR1
    assert supervise.stop_signal(["srun", "--mpi=pmix"]) == signal.SIGUSR1
    assert supervise.stop_signal([sys.executable, "-m", "torch.distributed.run"]) == signal.SIGTERM
