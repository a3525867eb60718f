"""Elastic training: torchrun's elastic agent loses a node, the run continues on the rest.

Two real elastic agents ("nodes", ``--nproc-per-node=1`` each) rendezvous on this host
(``--rdzv-backend=c10d --nnodes=1:2``). After the first checkpoint one agent's whole
process group is SIGKILLed; the surviving agent restarts its worker at world size 1,
which resumes from the newest checkpoint by itself (``dist.elastic`` is the consent to
reshard) and completes. The final weights are compared with a reference that trains the
same checkpoint as 2 ranks and continues at 1 rank through ``--resume --reshard``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_support import (
    PY,
    TINY,
    TRAIN,
    Ranks,
    deep_update,
    env,
    free_port,
    ok,
    records,
    run,
    torchrun_env,
    weights,
    write_config,
)

from scalelab.analysis import runs
from scalelab.errors import UsageError
from scalelab.launch import commands
from scalelab.train import checkpoint as ckpt
from scalelab.train.batch import check_elastic, elastic_world_sizes
from scalelab.train.config import from_dict

EPOCHS = 3
#: 64 steps per epoch at a global batch of 64, deterministic, one thread per rank: about a
#: second per epoch here, so the kill right after the first checkpoint lands inside the run.
CFG = deep_update(
    TINY,
    {
        "model": {"options": {"width": 16, "hidden": 64}},
        "data": {"num_samples": 4096, "image_shape": [3, 24, 24], "val_samples": 64},
        "optim": {"global_batch_size": 64},
        "train": {"epochs": EPOCHS, "deterministic": True},
        "checkpoint": {"every_epochs": 1, "keep": EPOCHS},
        "dist": {
            "timeout_s": 30,
            "elastic": {"min_nodes": 1, "max_nodes": 2, "max_restarts": 2},
        },
    },
)
#: Short heartbeats and last call: the survivor's next round closes within seconds of the
#: lost agent's last heartbeat (torch's defaults: 5 s x 3 and 30 s).
RDZV = {"last_call_timeout": "2", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}


def _agent(config: Path, out: Path, port: int, host: bool, log: Path) -> subprocess.Popen:
    argv = commands.torchrun_elastic(
        nproc_per_node=1,
        min_nodes=1,
        max_nodes=2,
        max_restarts=2,
        endpoint=f"127.0.0.1:{port}",
        run_id="elastic-test",
        rdzv_conf={**RDZV, "is_host": str(host).lower()},  # the survivor hosts the store
    )
    per_rank = [PY, *TRAIN, "--config", str(config), "--out", str(out)]
    with open(log, "w") as fh:
        return subprocess.Popen(
            commands.compose(argv, per_rank),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env(),
            start_new_session=True,
        )


def _wait_checkpoint(directory: Path, agents: list[subprocess.Popen], logs: list[Path]) -> Path:
    """The first complete checkpoint (its checksum written after it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = [p for p in ckpt.list_checkpoints(directory) if ckpt.checksum_path(p).exists()]
        if found:
            return found[-1]
        if any(a.poll() is not None for a in agents):
            raise AssertionError(
                "an agent exited early:\n" + "\n".join(p.read_text() for p in logs)
            )
        time.sleep(0.02)
    raise AssertionError("no checkpoint within 120 s:\n" + "\n".join(p.read_text() for p in logs))


def _lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and everything under it: torchrun starts each worker in a session
    of its own, so the agent's process group alone would leave its worker training."""
    for pid in [agent.pid, *_descendants(agent.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait(timeout=10)


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


def _kill(proc: subprocess.Popen) -> None:
    for pid in _descendants(proc.pid):  # workers in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _elastic_run(tmp_path: Path, config: Path, out: Path) -> str:
    """Two agents, one killed after the first checkpoint; the survivor's log."""
    port = free_port()
    logs = [tmp_path / "agent-a.log", tmp_path / "agent-b.log"]
    survivor = _agent(config, out, port, True, logs[0])
    time.sleep(1.0)  # agent a binds the rendezvous store first
    lost = _agent(config, out, port, False, logs[1])
    try:
        _wait_checkpoint(out / "checkpoints", [survivor, lost], logs)
        _lose_node(lost)  # the agent and its worker
        assert not (out / "summary.json").exists(), "the run ended before the kill"
        code = survivor.wait(timeout=150)
    finally:
        _kill(survivor)
        _kill(lost)
    text = logs[0].read_text()
    assert code == 0, text[-6000:]
    return text


def _reference(tmp_path: Path, config: Path, resumed_from: str) -> Path:
    """2 ranks to the end, then from the checkpoint the elastic run resumed from: 1 rank."""
    full = tmp_path / "ref-2"
    ranks = Ranks(
        [*TRAIN, "--config", str(config), "--out", str(full)], torchrun_env(free_port()), tmp_path
    )
    try:
        assert ranks.wait(150) == [0, 0], ranks.log(0) + ranks.log(1)
    finally:
        ranks.kill_all()
    cut = tmp_path / "ref-2-then-1"
    shutil.copytree(full, cut)
    (cut / "summary.json").unlink()
    (cut / "model.pt").unlink()
    names = [p.name for p in ckpt.list_checkpoints(cut / "checkpoints")]
    assert resumed_from in names, (resumed_from, names)
    for path in ckpt.list_checkpoints(cut / "checkpoints"):
        if path.name > resumed_from:  # zero-padded step numbers sort as numbers
            path.unlink()
            ckpt.checksum_path(path).unlink()
    ok(run([PY, *TRAIN, "--config", str(config), "--out", str(cut), "--resume", "--reshard"], 150))
    return cut


def test_lost_agent_run_continues_at_one_rank_and_matches_a_resharded_resume(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "run.yaml", CFG)
    out = tmp_path / "elastic"
    log = _elastic_run(tmp_path, config, out)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 1, summary
    assert summary["world_sizes"] == [2, 1] and summary["world_size_changed"] is True
    (change,) = records(out, "membership")
    assert (change["world_size_was"], change["world_size"]) == (2, 1)
    assert change["restart_count"] >= 1
    (resumed,) = records(out, "resume")
    assert change["global_step"] == resumed["global_step"] > 0
    assert "world size 2 -> 1" in log
    info = json.loads((out / "run_info.json").read_text())
    assert info["layout"]["world_size"] == 1 and info["layout"]["restart_count"] >= 1
    starts = json.loads((out / "provenance.json").read_text())["incidental"]["starts"]
    assert [s["world_size"] for s in starts] == [2, 1], starts
    assert starts[-1]["restart_count"] >= 1
    assert runs.load_run(out)["flags"] == runs.WORLD_SIZE_CHANGED  # not a scaling point

    ref = _reference(tmp_path, config, resumed["checkpoint"])
    a, b = weights(out), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a), "elastic weights differ from the reference"
    assert json.loads((ref / "summary.json").read_text())["world_sizes"] == [2, 1]


@pytest.mark.parametrize(
    ("elastic", "optim", "message"),
    [
        (
            {"min_nodes": 3, "max_nodes": 2},
            {},
            "field 'dist.elastic.min_nodes': 3 is more than max_nodes=2",
        ),
        ({"min_nodes": 0, "max_nodes": 2}, {}, "field 'dist.elastic.min_nodes': must be >= 1"),
        ({"max_restarts": -1}, {}, "field 'dist.elastic.max_restarts': must be >= 0"),
        (
            {"min_nodes": 1, "max_nodes": 2},
            {"per_rank_batch_size": 8, "global_batch_size": None},
            "field 'dist.elastic': needs optim.global_batch_size",
        ),
        (
            {"min_nodes": 1, "max_nodes": 3},
            {"global_batch_size": 32},
            "field 'dist.elastic': at 3 node(s) x 1 ranks: field 'optim.global_batch_size': "
            "32 is not divisible by world_size",
        ),
    ],
    ids=["min-above-max", "min-zero", "negative-restarts", "weak-scaling", "batch-split"],
)
def test_bad_elastic_ranges_are_refused_in_one_line(
    elastic: dict, optim: dict, message: str
) -> None:
    cfg = deep_update(TINY, {"dist": {"elastic": elastic}, "optim": optim})
    with pytest.raises(UsageError) as info:
        check_elastic(from_dict(cfg), tasks_per_node=1)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_range_every_world_size_can_split_is_accepted() -> None:
    cfg = from_dict(deep_update(TINY, {"dist": {"elastic": {"min_nodes": 1, "max_nodes": 2}}}))
    assert elastic_world_sizes(cfg, 2) == [2, 4]
    check_elastic(cfg, tasks_per_node=2)  # 32 splits over 2 and 4 ranks
