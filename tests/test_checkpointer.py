"""The Checkpointer: the one owner of a run's checkpoints (save, find the newest valid one,
prune, resume), asked by the trainer. Driven here on a real single-process job (the
"none" backend): no launcher, no subprocess."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from train_support import TINY, deep_update

from scalelab.backends import make_backend
from scalelab.backends.parallel_dims import ParallelDims
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.layout import Layout
from scalelab.models import build
from scalelab.train import checkpoint as ckpt
from scalelab.train.batch import resolve_batch
from scalelab.train.checkpoint import Checkpointer
from scalelab.train.config import from_dict
from scalelab.train.setup import build_job, open_datasets, steps_per_epoch
from scalelab.train.state import TrainState

CPU = torch.device("cpu")


def make_job(
    out: Path,
    *,
    resume: bool = False,
    reshard: bool = False,
    seed: int = 7,
    keep: int = 2,
    world_size: int = 1,
):
    cfg = from_dict(deep_update(TINY, {"seed": seed, "checkpoint": {"keep": keep}}))
    layout = Layout(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=29500,
        launcher="single",
    )
    plan = resolve_batch(cfg, ParallelDims.of(1, cfg.dist.tp))
    train_set, val_set = open_datasets(cfg)
    torch.manual_seed(seed)
    model = build(cfg.model.name, cfg.model.options, DataSpec.of(train_set))
    backend = make_backend("none", dataclasses.replace(layout, world_size=1), cfg.dist, CPU)
    data = (train_set, val_set, steps_per_epoch(cfg, plan, train_set))
    return build_job(cfg, layout, plan, backend, model, data, CPU, 1, out, resume, reshard=reshard)


def keeper(job, state: TrainState | None = None, beat=lambda: None) -> Checkpointer:
    """The trainer's Checkpointer of ``job`` (its run directory's checkpoint folder)."""
    return Checkpointer(
        job.out / "checkpoints", job, TrainState() if state is None else state, beat
    )


def weights(job) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in job.raw_model.state_dict().items()}


def test_save_writes_checksummed_files_keeps_the_newest_and_finds_the_newest_valid(tmp_path):
    job = make_job(tmp_path / "run", keep=2)
    state, beats = TrainState(), []
    owner = keeper(job, state, lambda: beats.append(1))
    for step in (3, 6, 9):
        state.global_step = step
        path = owner.save()
        assert path == tmp_path / "run" / "checkpoints" / f"ckpt-{step:09d}.pt"
        ckpt.verify(path)  # its sha256 is beside it
    assert len(beats) == 6  # the watchdog hears of every write, before and after
    assert [p.name for p in ckpt.list_checkpoints(owner.directory)] == [
        "ckpt-000000009.pt",
        "ckpt-000000006.pt",
    ]  # keep 2: the oldest pruned
    found, saved = owner.find_latest()
    assert found.name == "ckpt-000000009.pt" and saved["global_step"] == 9
    assert saved["world_size"] == 1 and saved["config"] == job.cfg.to_dict()
    # a corrupted newest one is skipped for the older valid one
    data = bytearray(found.read_bytes())
    data[-10] ^= 0xFF
    found.write_bytes(bytes(data))
    assert owner.find_latest()[0].name == "ckpt-000000006.pt"


def test_resume_restores_weights_position_and_schedule(tmp_path):
    out = tmp_path / "run"
    job = make_job(out)
    state = TrainState(epoch=0, step_in_epoch=5, global_step=5)
    for _ in range(5):
        job.optimizer.step()  # no gradients: the weights stay, the schedule moves
        job.scheduler.step()
    before, lr = weights(job), job.scheduler.get_last_lr()
    keeper(job, state).save()

    again = make_job(out, resume=True, seed=7)
    with torch.no_grad():
        for p in again.raw_model.parameters():
            p.add_(1.0)  # not the saved weights
    fresh = TrainState()
    keeper(again, fresh).resume()
    again.metrics.close()
    assert all(torch.equal(before[k], v) for k, v in again.raw_model.state_dict().items())
    assert (fresh.epoch, fresh.step_in_epoch, fresh.global_step, fresh.resumes) == (0, 5, 5, 1)
    assert again.scheduler.get_last_lr() == lr
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "resume" and record["checkpoint"] == "ckpt-000000005.pt"


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, capsys):
    job = make_job(tmp_path / "run", resume=True)
    state = TrainState()
    keeper(job, state).resume()
    assert state.global_step == 0 and state.resumes == 0
    assert "no checkpoint in" in capsys.readouterr().out


def saved_by(job) -> dict:
    owner = keeper(job, TrainState(global_step=4))
    owner.save()
    return owner.find_latest()[1]


def test_resume_refuses_another_layout_unless_resharding(tmp_path):
    saved = saved_by(make_job(tmp_path / "a"))
    wider = make_job(tmp_path / "b", resume=True, world_size=2)
    with pytest.raises(
        UsageError,
        match=r"written by 1 ranks \(tp 1, pp 1\), this job has 2 "
        r"\(tp 1, pp 1\); pass --reshard",
    ):
        keeper(wider).check("ckpt-000000004.pt", saved)
    resharding = make_job(tmp_path / "c", resume=True, reshard=True, world_size=2)
    keeper(resharding).check("ckpt-000000004.pt", saved)


def test_resume_refuses_a_checkpoint_of_another_run_naming_the_field(tmp_path):
    saved = saved_by(make_job(tmp_path / "a", seed=7))
    other = make_job(tmp_path / "b", resume=True, seed=8)
    with pytest.raises(UsageError, match=r"belongs to another run: seed: 7 \(checkpoint\) != 8"):
        keeper(other).check("ckpt-000000004.pt", saved)
    # a field a resume may change (where it runs, not what it computes) is no difference
    same = make_job(tmp_path / "c", resume=True, seed=7, keep=5)
    keeper(same).check("ckpt-000000004.pt", saved)


def test_resume_refuses_a_changed_position_meaning(tmp_path):
    saved = saved_by(make_job(tmp_path / "a"))
    job = make_job(tmp_path / "b", resume=True)
    moved = {**saved, "steps_per_epoch": saved["steps_per_epoch"] + 1}
    with pytest.raises(UsageError, match="the position in the epoch would not carry over"):
        keeper(job).check("ckpt-000000004.pt", moved)
