"""Faults on the Slurm test cluster (issue 11): preemption, a dead rank, a stuck rank.

Real Slurm, real srun --mpi=pmix across two nodes, real signals. Every test has a hard
timeout, checks that no process of the job is left in ANY node's namespace, and
records its figures (survived, work lost in steps, seconds to fail) in
``$SCALELAB_RELIABILITY_DIR`` (default build/reliability/) for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import VENV_BIN, run
from reliability import record
from train_support import TINY, deep_update, wait_for_record, weights

from scalelab.testcluster.procs import _pids_in_netns

pytestmark = pytest.mark.cluster
PY = str(VENV_BIN / "python")
RUN_CFG = deep_update(
    TINY,
    {
        "model": {"options": {"width": 32, "hidden": 128}},
        "optim": {"global_batch_size": 64},
        "train": {"epochs": 1, "deterministic": True},
        "checkpoint": {"every_steps": 10, "keep": 3},
    },
)


def job_processes(cluster, needle: str) -> list[str]:
    """Live processes, on the host and in every node's namespace, that mention ``needle``."""
    spec = cluster.cluster.spec
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    for node in spec.node_names():
        pids |= set(_pids_in_netns(spec.netns(node)))
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, UnicodeDecodeError):
            continue
        if needle in cmd and state != "Z" and "pytest" not in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


def wait_gone(cluster, needle: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := job_processes(cluster, needle)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def data(cluster) -> Path:
    out = cluster.shared_dir / "faults-data"
    if not (out / "index.json").exists():
        run(
            [
                PY,
                "-m",
                "scalelab",
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
                "4",
                "--quiet",
                "--out",
                str(out),
            ],
            timeout=300,
        )
    return out


def spec_file(cluster, data: Path, name: str, **dist) -> Path:
    point = {
        "backend": "ddp",
        "mode": "strong",
        "nodes": 2,
        "tasks_per_node": 1,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    cfg = deep_update(RUN_CFG, {"dist": dist} if dist else {})
    cfg["data"] = {"source": "staged", "path": str(data)}
    path = cluster.shared_dir / f"{name}.spec.json"
    path.write_text(
        json.dumps(
            {
                "point": point,
                "run_config": cfg,
                "launch": {
                    "local": "mpirun",
                    "srun_mpi": "pmix",
                    "cpus_per_task": 1,
                    "timeout_s": 30,
                    "extra_srun_args": [],
                },
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def reference(cluster, data, tmp_path_factory) -> Path:
    """The uninterrupted run (2 ranks, mpirun on the host: same weights as srun's)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    spec = spec_file(cluster, data, "reference")
    run(
        [PY, "-m", "scalelab", "launch", "--spec", spec.read_text(), "--out", str(out)], timeout=300
    )
    return out


def sbatch_wait(cluster, name: str, spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    """Submit `scalelab launch` as a 2-node batch job; `sbatch --wait` returns its exit."""
    script = cluster.shared_dir / f"{name}.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f'{PY} -m scalelab launch --spec "$(cat {spec})" --out {out}\n'
        'rc=$?\necho "scalelab-launch-exit $rc $(date +%s.%N)"\nexit $rc\n'
    )
    return subprocess.Popen(
        [
            "sbatch",
            "--wait",
            *extra,
            "-N2",
            "-n2",
            "--ntasks-per-node=1",
            f"--job-name={name}",
            f"--output={cluster.shared_dir / name}-%j.log",
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.env(),
    )


def test_preemption_by_scancel_signal_then_resume(cluster, data, reference):
    out = cluster.shared_dir / "preempt-run"
    spec = spec_file(cluster, data, "preempt")
    job = sbatch_wait(cluster, "preempt", spec, out)
    try:
        step = wait_for_record(
            out / "metrics.jsonl", lambda r: r.get("kind") == "step" and r["global_step"] >= 14, 180
        )
        queue = subprocess.run(
            ["squeue", "-h", "-n", "preempt", "-o", "%i"],
            capture_output=True,
            text=True,
            env=cluster.env(),
        )
        job_id = queue.stdout.split()[0]
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=cluster.env())
        text, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    log = "".join(p.read_text() for p in cluster.shared_dir.glob("preempt-*.log"))
    assert job.returncode == 75, f"sbatch --wait exit {job.returncode}\n{text}\n{log}"
    assert wait_gone(cluster, str(out)) == [], "processes outlived the preempted job"
    stopped = [
        json.loads(x)
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if '"preempted"' in x
    ]
    assert not (out / "summary.json").exists()
    # Requeue (what Snakemake's retry or `scontrol requeue` does): the same job again.
    again = sbatch_wait(cluster, "preempt-again", spec, out)
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    resumed = [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in x
    ]
    assert resumed, "the second job did not resume from the checkpoint"
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    lost = step["global_step"] - resumed[-1]["global_step"] if stopped else None
    record(
        "preemption",
        survived=True,
        signal="scancel --signal=USR1",
        exit_code=75,
        signalled_at_step=step["global_step"],
        resumed_at_step=resumed[-1]["global_step"],
        steps_lost=max(lost or 0, 0),
        bitwise_equal=True,
    )


def _rank_on(cluster, node: str, needle: str, timeout: float = 120) -> int:
    ns = cluster.cluster.spec.netns(node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _pids_in_netns(ns):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "scalelab train" in cmd and needle in cmd:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no training rank on {node}")


@pytest.mark.parametrize(
    "fault, sig", [("dead-rank", signal.SIGKILL), ("stuck-rank", signal.SIGSTOP)]
)
def test_dead_or_stuck_rank_across_nodes_fails_in_bounded_time(cluster, data, fault, sig):
    out = cluster.shared_dir / f"{fault}-run"
    spec = spec_file(cluster, data, fault, timeout_s=10)
    job = sbatch_wait(cluster, fault, spec, out)
    try:
        wait_for_record(
            out / "metrics.jsonl", lambda r: r.get("kind") == "step" and r["global_step"] >= 3, 180
        )
        victim = _rank_on(cluster, "n2", str(out))
        os.kill(victim, sig)
        t0 = time.time()
        text, _ = job.communicate(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
    log = "".join(p.read_text() for p in cluster.shared_dir.glob(f"{fault}-*.log"))
    assert job.returncode not in (0, 75), text + log
    # Time to the end of launch, from the job's own log (sbatch --wait polls slowly).
    ended = [float(x.split()[2]) for x in log.splitlines() if x.startswith("scalelab-launch")]
    assert ended, log
    seconds = ended[-1] - t0
    assert not (out / "summary.json").exists(), "a failed run looks complete"
    bound = 15 if sig == signal.SIGKILL else 10 + 60 + 20  # timeout_s + watchdog grace + slack
    assert seconds < bound, f"{fault}: job took {seconds:.1f} s to fail (bound {bound} s)\n{log}"
    assert wait_gone(cluster, str(out)) == [], f"{fault}: processes outlived the job"
    record(
        fault,
        survived=True,
        seconds_to_fail=round(seconds, 1),
        bound_s=bound,
        summary_written=False,
    )


@pytest.mark.disruptive
def test_lost_node_fails_the_job_and_the_retry_resumes(cluster, data, reference):
    """Kill node n2 (its slurmd and every process in its namespace) mid-job: the job
    fails in bounded time with nothing marked complete; with the node back, the retry
    resumes from the last checkpoint and ends with the uninterrupted run's weights."""
    out = cluster.shared_dir / "lost-node-run"
    spec = spec_file(cluster, data, "lost-node")
    # --no-requeue: Slurm would requeue the job itself on NODE_FAIL (JobRequeue=1); here
    # the retry is explicit, as Snakemake's would be, so the failure can be observed.
    job = sbatch_wait(cluster, "lost-node", spec, out, "--no-requeue")
    killed: list[int] = []
    try:
        step = wait_for_record(
            out / "metrics.jsonl", lambda r: r.get("kind") == "step" and r["global_step"] >= 14, 300
        )
        _rank_on(cluster, "n2", str(out))
        killed = cluster.cluster.kill_node("n2")
        t0 = time.time()
        text, _ = job.communicate(timeout=300)
        seconds = time.time() - t0
        log = "".join(p.read_text() for p in cluster.shared_dir.glob("lost-node-*.log"))
        assert killed and job.returncode not in (0, 75), f"{job.returncode}: {text}\n{log}"
        assert not (out / "summary.json").exists(), "a run on a lost node looks complete"
        assert wait_gone(cluster, str(out)) == [], "processes outlived the failed job"
    finally:
        if job.poll() is None:
            job.kill()
        if killed:  # the session's cluster is shared: never leave a node dead
            cluster.cluster.restore_node("n2", timeout=300)
    again = sbatch_wait(cluster, "lost-node-retry", spec, out)
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    resumed = [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in x
    ]
    assert resumed, "the retry did not resume from a checkpoint"
    lost = step["global_step"] - resumed[-1]["global_step"]
    assert 0 <= lost <= RUN_CFG["checkpoint"]["every_steps"], lost
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    record(
        "lost-node",
        survived=True,
        seconds_to_fail=round(seconds, 1),
        killed_processes=len(killed),
        steps_lost=lost,
        checkpoint_interval_steps=RUN_CFG["checkpoint"]["every_steps"],
        bitwise_equal=True,
    )


@pytest.fixture()
def small_shared_disk(cluster, tmp_path):
    """A 64 MiB ext4 filesystem mounted at the same path on the host and inside every
    node's (private) mount namespace: one loop device, so one filesystem seen by all."""
    image = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-O", "^has_journal", str(image)], check=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mnt = cluster.shared_dir / "small-disk"
    mnt.mkdir(exist_ok=True)
    state = cluster.cluster._load()
    slurmds = [state["pids"][f"slurmd-{n}"] for n in cluster.cluster.spec.node_names()]
    subprocess.run(["mount", dev, str(mnt)], check=True)
    for pid in slurmds:
        subprocess.run(["nsenter", "-t", str(pid), "-m", "mount", dev, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for pid in slurmds:
            subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", "-l", str(mnt)], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.disruptive
def test_full_disk_at_checkpoint_time_then_rerun_resumes(
    cluster, data, reference, small_shared_disk
):
    """The disk fills while the second checkpoint is written: one clear error line, the
    first checkpoint intact, nothing marked complete; with space freed, the rerun resumes
    from that checkpoint and ends with the uninterrupted run's weights."""
    from scalelab.train import checkpoint as ckpt

    size = max(p.stat().st_size for p in (reference / "checkpoints").glob("ckpt-*.pt"))
    out = small_shared_disk / "run"
    ballast = small_shared_disk / "ballast"
    free = os.statvfs(small_shared_disk).f_bavail * os.statvfs(small_shared_disk).f_frsize
    # Room for the run's small files and one checkpoint and a half: the second fails.
    with open(ballast, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - int(1.5 * size) - (1 << 20)))
    spec = spec_file(cluster, data, "full-disk")
    job = sbatch_wait(cluster, "full-disk", spec, out, "--no-requeue")
    text, _ = job.communicate(timeout=300)
    log = "".join(p.read_text() for p in cluster.shared_dir.glob("full-disk-*.log"))
    assert job.returncode not in (0, 75), f"{job.returncode}: {text}\n{log}"
    errors = [x for x in log.splitlines() if x.startswith("scalelab train: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], log
    assert "Traceback" not in log, log
    assert not (out / "summary.json").exists()
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert kept, "the previous checkpoint is gone"
    ckpt.verify(kept[0])  # intact: its sha256 matches
    ballast.unlink()
    again = sbatch_wait(cluster, "full-disk-retry", spec, out)
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    resumed = [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in x
    ]
    assert resumed and resumed[-1]["checkpoint"] == kept[0].name
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    record(
        "full-disk-checkpoint",
        survived=True,
        error_line=errors[0][:120],
        previous_checkpoint_intact=True,
        resumed_from=kept[0].name,
        bitwise_equal=True,
    )
