"""Preemption and resume: SIGTERM mid-epoch -> checkpoint, exit 75; --resume -> same weights.

The two ranks are started with the environment ``srun -n 2`` gives its tasks
(the Slurm launcher path, from environment variables only), and only ONE of
them receives the signal: the allreduced stop flag must stop both at the same
step.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from train_support import (
    TINY,
    TRAIN,
    Ranks,
    deep_update,
    records,
    slurm_env,
    wait_for_record,
    weights,
    write_config,
)

import scalelab.train
from scalelab.errors import UsageError
from scalelab.train import checkpoint as ckpt

#: 40 steps per epoch, 2 epochs, steps slow enough (tens of ms) that a signal sent at
#: step 4 of the second epoch lands well inside it even on a loaded machine.
CFG = deep_update(
    TINY,
    {
        "model": {"options": {"width": 32, "hidden": 128}},
        "data": {"num_samples": 2560, "image_shape": [3, 32, 32], "val_samples": 128},
        "optim": {"global_batch_size": 64},
        "train": {"epochs": 2, "deterministic": True},
    },
)
STEPS = 40
EXIT_PREEMPTED = 75


def _srun(config: Path, out: Path, job: int, logs: Path, *extra: str) -> Ranks:
    logs.mkdir(parents=True, exist_ok=True)
    return Ranks([*TRAIN, "--config", str(config), "--out", str(out), *extra], slurm_env(job), logs)


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", CFG)
    full, cut = tmp_path / "full", tmp_path / "cut"

    ranks = _srun(config, full, 101, tmp_path / "logs-full")
    try:
        assert ranks.wait(120) == [0, 0], ranks.log(0) + ranks.log(1)
    finally:
        ranks.kill_all()

    ranks = _srun(config, cut, 102, tmp_path / "logs-cut")
    try:
        wait_for_record(
            cut / "metrics.jsonl",
            lambda r: r["kind"] == "step" and r["epoch"] == 1 and r["step"] >= 4,
            timeout=90,
            procs=ranks,
        )
        ranks.procs[1].send_signal(signal.SIGTERM)  # rank 1 only
        t0 = time.monotonic()
        codes = ranks.wait(60)
        assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (
            ranks.log(0)
            + ranks.log(1)
            + "\n".join((cut / "metrics.jsonl").read_text().splitlines()[-4:])
        )
        assert time.monotonic() - t0 < 30
    finally:
        ranks.kill_all()
    assert not (cut / "summary.json").exists() and not (cut / "model.pt").exists()
    (stopped,) = records(cut, "preempted")
    newest = ckpt.load(ckpt.list_checkpoints(cut / "checkpoints")[0])
    assert newest["epoch"] == 1 and 4 <= newest["step_in_epoch"] < STEPS  # mid second epoch
    assert newest["step_in_epoch"] == stopped["step_in_epoch"]
    assert newest["global_step"] == STEPS + newest["step_in_epoch"]
    assert len(newest["rng"]) == 2
    assert "rerun with --resume" in ranks.log(0) + ranks.log(1)

    ranks = _srun(config, cut, 103, tmp_path / "logs-resume", "--resume")
    try:
        assert ranks.wait(120) == [0, 0], ranks.log(0) + ranks.log(1)
    finally:
        ranks.kill_all()
    (resumed,) = records(cut, "resume")
    assert resumed["step_in_epoch"] == newest["step_in_epoch"]
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert json.loads((cut / "summary.json").read_text())["resumes"] == 1
    # the interrupted epoch's statistics were carried over, not restarted
    assert records(cut, "epoch")[-1]["train_loss"] == records(full, "epoch")[-1]["train_loss"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(path: Path) -> None:
    """One bit in the middle of the file: tensor data, which torch.load would accept."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _flip_one_bit], ids=["truncated", "bit-flip"])
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path: Path, capsys, damage) -> None:
    cfg = deep_update(
        TINY,
        {
            "train": {"epochs": 2},
            "checkpoint": {"every_steps": 3, "keep": 2},
            "dist": {"backend": "none"},
        },
    )
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    scalelab.train.run(cfg, full)
    scalelab.train.run(cfg, crashed)
    # Make `crashed` look like a run whose node died while writing its last checkpoint.
    (crashed / "summary.json").unlink()
    (crashed / "model.pt").unlink()
    last = ckpt.list_checkpoints(crashed / "checkpoints")[0]
    damage(last)
    capsys.readouterr()
    summary = scalelab.train.run(cfg, crashed, resume=True)
    err = capsys.readouterr().err
    assert f"skipping unreadable checkpoint {last}" in err
    (resumed,) = records(crashed, "resume")
    assert resumed["global_step"] == 15  # the previous one: 16 steps, every 3
    a, b = weights(full), weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["status"] == "completed" and (crashed / "summary.json").exists()
    # A completed run is not redone.
    assert scalelab.train.run(cfg, crashed, resume=True) == summary


def test_resume_refuses_a_different_batch(tmp_path: Path) -> None:
    cfg = deep_update(TINY, {"dist": {"backend": "none"}})
    scalelab.train.run(cfg, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    other = deep_update(cfg, {"optim": {"global_batch_size": 64}})
    # The stored config is compared first and names the field (issue 23).
    with pytest.raises(UsageError, match=r"optim\.global_batch_size: 32 \(checkpoint\) != 64"):
        scalelab.train.run(other, tmp_path / "run", resume=True)
