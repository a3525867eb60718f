"""Data parallelism really averages gradients: N ranks == 1 rank, ddp == horovod.

Same global batch and seed, a model without batch-norm: after N steps, 2 ranks
(with and without gradient accumulation) hold the weights of 1 rank, under
torchrun and mpirun, with ddp and horovod. The same command and config run
unchanged under every launcher; only the launcher in front changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_support import (
    MPIRUN,
    PY,
    TINY,
    TORCHRUN,
    TRAIN,
    max_diff,
    ok,
    records,
    run,
    weights,
    write_config,
)

from scalelab.models import build_model
from scalelab.train.records import EPOCH_LINE_RE

ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One reference run and three 2-rank runs of the same config."""
    root = tmp_path_factory.mktemp("equiv")
    config = write_config(root / "run.yaml", TINY)
    cases = {
        "single": ([PY], ["--set", "dist.backend=none"]),
        "ddp-torchrun-accum2": (TORCHRUN, ["--set", "optim.grad_accum_steps=2"]),
        "ddp-mpirun": ([*MPIRUN, PY], ["--set", "dist.backend=ddp"]),
        "horovod-mpirun-accum2": (
            [*MPIRUN, PY],
            [
                "--set",
                "dist.backend=horovod",
                "--set",
                "optim.grad_accum_steps=2",
                "--set",
                "dist.horovod.fusion_threshold_mb=1",
            ],
        ),
    }
    out = {}
    for name, (launcher, extra) in cases.items():
        run_dir = root / name
        proc = ok(
            run(
                [*launcher, *TRAIN, "--config", str(config), "--out", str(run_dir), *extra],
                timeout=120,
            )
        )
        (run_dir / "stdout.txt").write_text(proc.stdout)
        out[name] = run_dir
    return out


def test_training_moved_the_weights(runs: dict[str, Path]) -> None:
    torch.manual_seed(TINY["seed"])
    cfg = TINY["data"]
    initial = build_model(
        "cnn", cfg["num_classes"], tuple(cfg["image_shape"]), **TINY["model"]["options"]
    ).state_dict()
    assert max_diff(weights(runs["single"]), initial) > 1e-3  # else equality proves nothing


@pytest.mark.parametrize("name", ["ddp-torchrun-accum2", "ddp-mpirun", "horovod-mpirun-accum2"])
def test_two_ranks_equal_one_rank(runs: dict[str, Path], name: str) -> None:
    assert max_diff(weights(runs[name]), weights(runs["single"])) < ATOL


def test_ddp_and_horovod_agree(runs: dict[str, Path]) -> None:
    for ddp in ("ddp-torchrun-accum2", "ddp-mpirun"):
        assert max_diff(weights(runs[ddp]), weights(runs["horovod-mpirun-accum2"])) < ATOL


@pytest.mark.parametrize(
    "name, backend, launcher",
    [
        ("single", "none", "single"),
        ("ddp-torchrun-accum2", "ddp", "torchrun"),
        ("ddp-mpirun", "ddp", "openmpi"),
        ("horovod-mpirun-accum2", "horovod", "openmpi"),
    ],
)
def test_run_directory_describes_the_run(
    runs: dict[str, Path], name: str, backend: str, launcher: str
) -> None:
    import json

    run_dir = runs[name]
    summary = json.loads((run_dir / "summary.json").read_text())
    world = 1 if name == "single" else 2
    assert (summary["status"], summary["backend"], summary["launcher"]) == (
        "completed",
        backend,
        launcher,
    )
    assert (summary["world_size"], summary["global_batch_size"]) == (world, 32)
    assert summary["per_rank_batch_size"] == 32 // world
    assert summary["global_steps"] == 8 and summary["samples_per_s"] > 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert len(info["hostnames"]) == world and info["layout"]["world_size"] == world
    assert (run_dir / "config.yaml").exists()
    steps = records(run_dir, "step")
    assert [r["global_step"] for r in steps] == list(range(1, 9))
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in steps)
    assert (steps[-1]["comm_s"] is not None) == (backend == "horovod")
    (epoch,) = records(run_dir, "epoch")
    assert 0 <= epoch["val_acc"] <= 1 and epoch["train_loss"] > 0
    lines = [
        m
        for line in (run_dir / "stdout.txt").read_text().splitlines()
        if (m := EPOCH_LINE_RE.match(line))
    ]
    assert len(lines) == 1 and lines[0]["epoch"] == "1"  # rank 0 only: other ranks are quiet


def test_every_backend_measures_its_state_bytes(runs: dict[str, Path]) -> None:
    """Per-rank parameter/gradient/optimizer bytes come from each rank's tensors under every
    backend; unsharded, ddp and horovod hold the same (SGD with momentum: one buffer)."""
    found = {
        name: json.loads((runs[name] / "summary.json").read_text())
        for name in ("single", "ddp-mpirun", "horovod-mpirun-accum2")
    }
    params = {name: s["rank0_param_bytes"] for name, s in found.items()}
    assert len(set(params.values())) == 1 and params["single"] > 0, params
    for name, s in found.items():
        assert s["rank0_optim_state_bytes"] == s["rank0_param_bytes"], name
        assert s["rank0_state_bytes"] == 3 * s["rank0_param_bytes"], name
