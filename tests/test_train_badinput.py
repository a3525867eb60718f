"""Bad input: one line naming the field, exit 2, nothing that looks like a finished run.

Through the real entry point (``scalelab.cli.main``, and ``python -m scalelab``
under mpirun for the world-size-dependent check).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import scalelab_main
from train_support import MPIRUN, PY, TINY, TORCHRUN, TRAIN, deep_update, run, write_config

cli = scalelab_main


def assert_usage_error(rc: int, err: str, field: str, out_dir: Path) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scalelab train: error: ") and field in lines[0], lines[0]
    assert not (out_dir / "summary.json").exists()
    assert not (out_dir / "checkpoints").exists() and not (out_dir / "model.pt").exists()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.name=resnet51"], "field 'model.name'"),
        (["dist.backend=gloo"], "field 'dist.backend'"),
        (
            ["optim.global_batch_size=30", "optim.grad_accum_steps=4"],
            "field 'optim.global_batch_size'",
        ),
        (["optim.global_batch_size=512"], "field 'optim.global_batch_size'"),  # > dataset
        (["data.source=memory-npz", "data.path=/nonexistent/d.npz"], "field 'data.path'"),
        (["data.source=staged", "data.path=/nonexistent/staged"], "field 'data.path'"),
        (["data.source=memory-npz"], "field 'data.path'"),
        (["train.epochs=two"], "field 'train.epochs'"),
        (["model.options.depth=50"], "field 'model.options.depth'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, overrides: list[str], field: str) -> None:
    config = write_config(tmp_path / "run.yaml", TINY)
    out_dir = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    rc, _, err = cli("train", "--config", config, "--out", out_dir, *sets)
    assert_usage_error(rc, err, field, out_dir)
    assert not out_dir.exists()  # validated before anything is written


def test_reshard_without_resume_is_refused(tmp_path: Path) -> None:
    """--reshard only loosens a resume; alone it is a usage error, and nothing is written."""
    config = write_config(tmp_path / "run.yaml", TINY)
    out_dir = tmp_path / "run"
    rc, _, err = cli("train", "--config", config, "--out", out_dir, "--reshard")
    assert_usage_error(rc, err, "--reshard", out_dir)
    assert not out_dir.exists()


def test_missing_split_in_staged_data(tmp_path: Path) -> None:
    data = tmp_path / "staged"
    rc, _, err = cli(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        "120",
        "--num-classes",
        "3",
        "--image-size",
        "8",
        "8",
        "--out",
        data,
        "--quiet",
    )
    assert rc == 0, err
    config = write_config(
        tmp_path / "run.yaml",
        deep_update(
            TINY, {"data": {"source": "staged", "path": str(data), "val_split": "validation"}}
        ),
    )
    rc, _, err = cli("train", "--config", config, "--out", tmp_path / "run")
    assert_usage_error(rc, err, "field 'data.val_split'", tmp_path / "run")


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", deep_update(TINY, {"data": {"num_samples": 64}}))
    out_dir = tmp_path / "run"
    rc, out, err = cli("train", "--config", config, "--out", out_dir)
    assert rc == 0, err
    rc, _, err = cli("train", "--config", config, "--out", out_dir)
    assert rc == 2 and "--out" in err and "completed run" in err


def test_non_divisible_batch_on_two_ranks(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.yaml", deep_update(TINY, {"optim": {"global_batch_size": 33}})
    )
    out_dir = tmp_path / "run"
    proc = run([*MPIRUN, PY, *TRAIN, "--config", str(config), "--out", str(out_dir)], timeout=60)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("scalelab train:")]
    assert len(errors) == 1  # every rank refuses; rank 0 alone says so (the convention)
    assert "field 'optim.global_batch_size': 33 is not divisible by world_size" in errors[0]
    assert "Exit code:    2" in proc.stderr  # mpirun reports the ranks' exit status
    assert not out_dir.exists()


def test_horovod_under_torchrun_is_refused(tmp_path: Path) -> None:
    proc = run(
        [*TORCHRUN, *TRAIN, "--out", str(tmp_path / "run"), "--set", "dist.backend=horovod"],
        timeout=60,
    )
    assert proc.returncode != 0
    assert "field 'dist.backend': horovod needs an MPI launch" in proc.stderr
    assert not (tmp_path / "run").exists()
