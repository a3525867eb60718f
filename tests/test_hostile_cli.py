"""Issue 23, the CLI slice: inputs of the hostile probe that crashed, were accepted, or
exited with the wrong code, each as a named regression test. The one-line cases that need
no fixture are rows of tests/test_errors.py's table; these need a staged dataset, a
trained run, a real process, or a measurement.

The convention (``scalelab --help``, docs/reliability.md): 0 ok; 1 a check or run failed
(corrupt data, full disk); 2 bad usage or config; 75 stopped after a checkpoint.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scalelab_main
from train_support import TINY, env, write_config

from scalelab import launcher
from scalelab.errors import UsageError
from scalelab.study import plan as study_plan


def one_line(rc: int, err: str, command: str, code: int) -> str:
    """The single ``scalelab COMMAND: error:`` line of a failure with exit ``code``."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("scalelab ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"scalelab {command}: error: "), lines[0]
    assert rc == code, (rc, err)
    return lines[0]


def scalelab(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("hostile") / "data"
    rc, _, err = scalelab_main(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        "96",
        "--num-classes",
        "4",
        "--image-size",
        "16",
        "16",
        "--quiet",
        "--out",
        data,
    )
    assert rc == 0, err
    return data


@pytest.fixture(scope="module")
def trained(staged, tmp_path_factory) -> Path:
    """A finished run trained on ``staged``."""
    root = tmp_path_factory.mktemp("hostile-run")
    cfg = {**json.loads(json.dumps(TINY)), "data": {"source": "staged", "path": str(staged)}}
    proc = scalelab(
        "train", "--config", write_config(root / "run.yaml", cfg), "--out", root / "run"
    )
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.fixture()
def corrupt(staged, tmp_path) -> Path:
    """A copy of ``staged`` with one flipped byte in a training shard."""
    import shutil

    data = tmp_path / "corrupt"
    shutil.copytree(staged, data)
    flip_byte(sorted((data / "train").glob("*.images.npy"))[0])
    return data


def _staged_config(tmp_path: Path, data: Path) -> Path:
    cfg = {**json.loads(json.dumps(TINY)), "data": {"source": "staged", "path": str(data)}}
    return write_config(tmp_path / "staged.yaml", cfg)


# ---- exit codes --------------------------------------------------------------------------


def test_corrupt_shard_under_train_exits_1(corrupt, tmp_path):
    """Was 2 (wrapped as a config error): a shard failing its checksum is a failed check."""
    proc = scalelab(
        "train", "--config", _staged_config(tmp_path, corrupt), "--out", tmp_path / "run"
    )
    line = one_line(proc.returncode, proc.stderr, "train", 1)
    assert "sha256" in line and "data.train_split" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_corrupt_shard_under_launch_exits_1(corrupt, tmp_path):
    """`launch` returns its ranks' code: the same corrupt shard, the same exit 1."""
    point = {
        "backend": "none",
        "mode": "strong",
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    run_cfg = {**TINY, "data": {"source": "staged", "path": str(corrupt)}}
    spec = json.dumps(
        {"point": point, "run_config": run_cfg, "launch": {"local": "mpirun", "cpus_per_task": 1}}
    )
    proc = scalelab("launch", "--spec", spec, "--out", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if "error:" in ln and "sha256" in ln]


def test_evaluate_unknown_split_exits_2(trained, staged):
    """Was 1: a split the user names that the dataset lacks is bad usage."""
    rc, _, err = scalelab_main("evaluate", "--run", trained, "--data", staged, "--split", "bogus")
    line = one_line(rc, err, "evaluate", 2)
    assert "--split bogus" in line and "no split" in line


def test_evaluate_corrupt_shard_exits_1(trained, staged, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(staged, data)
    flip_byte(sorted((data / "test").glob("*.labels.npy"))[0])
    rc, _, err = scalelab_main("evaluate", "--run", trained, "--data", data)
    assert "sha256" in one_line(rc, err, "evaluate", 1)


def test_verify_not_a_dataset_exits_2_but_a_damaged_one_exits_1(staged, tmp_path):
    """`data verify --help`: 2 when DATA_DIR is not a dataset (was 1), 1 naming a bad file."""
    import shutil

    (tmp_path / "empty").mkdir()
    rc, _, err = scalelab_main("data", "verify", tmp_path / "empty")
    assert "not a staged dataset" in one_line(rc, err, "data", 2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"format": "npm", "files": {}}')
    rc, _, err = scalelab_main("data", "verify", foreign)
    assert "not a staged dataset" in one_line(rc, err, "data", 2)
    damaged = tmp_path / "damaged"
    shutil.copytree(staged, damaged)
    (damaged / "manifest.json").unlink()  # the index is still there: a damaged dataset
    rc, _, err = scalelab_main("data", "verify", damaged)
    assert "manifest.json: missing" in one_line(rc, err, "data", 1)


# ---- data stage: bounded before anything is allocated -------------------------------------


def test_num_samples_1e12_is_refused_before_allocating(tmp_path):
    """Was a 7 TiB allocation (MemoryError traceback); now one line, and this process's
    peak memory does not grow by the labels it would have drawn."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc, _, err = scalelab_main(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        10**12,
        "--quiet",
        "--out",
        tmp_path / "d",
    )
    assert "--num-samples" in one_line(rc, err, "data", 2)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"peak memory grew {grown_kib} KiB"
    assert list(tmp_path.iterdir()) == []


def test_a_sane_request_beyond_this_machine_is_exit_1_before_allocating(tmp_path):
    """2^31 images of 64x64x3 are within the sane limits but need ~100 GiB of labels and
    split ids and 26 TiB of disk: refused like a full disk (exit 1), nothing written."""
    rc, _, err = scalelab_main(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        2**31,
        "--image-size",
        64,
        64,
        "--quiet",
        "--out",
        tmp_path / "d",
    )
    line = one_line(rc, err, "data", 1)
    assert "Cannot allocate memory" in line or "No space left on device" in line
    assert "--num-samples 2147483648" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes", [0, 1, -3, 2**17])
def test_num_classes_outside_2_to_65536_is_refused(classes, tmp_path):
    rc, _, err = scalelab_main(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-classes",
        classes,
        "--quiet",
        "--out",
        tmp_path / "d",
    )
    assert "--num-classes" in one_line(rc, err, "data", 2)


def test_two_classes_still_stage(tmp_path):
    rc, _, err = scalelab_main(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-classes",
        2,
        "--num-samples",
        32,
        "--image-size",
        8,
        8,
        "--quiet",
        "--out",
        tmp_path / "d",
    )
    assert rc == 0, err


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04garbage", b"\x93NUMPY"],
    ids=["empty", "truncated-zip", "npy-header-only"],
)
def test_broken_npz_is_one_line(content, tmp_path):
    """An empty .npz was an EOFError traceback."""
    src = tmp_path / "in.npz"
    src.write_bytes(content)
    rc, _, err = scalelab_main(
        "data", "stage", "--source", "npz", "--path", src, "--quiet", "--out", tmp_path / "d"
    )
    assert "in.npz" in one_line(rc, err, "data", 2)
    assert not (tmp_path / "d").exists()


# ---- launch: layouts that cannot run -----------------------------------------------------

GOOD_POINT = {
    "backend": "ddp",
    "mode": "strong",
    "nodes": 1,
    "tasks_per_node": 2,
    "gpus_per_task": 0,
    "repeat": 0,
}


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("nodes", -1, "point.nodes"),
        ("nodes", 0, "point.nodes"),
        ("tasks_per_node", 0, "point.tasks_per_node"),
        ("tasks_per_node", 2.0, "not an integer"),  # was `mpirun -n 2.0`
        ("tasks_per_node", "2", "not an integer"),
        ("nodes", True, "not an integer"),
        ("gpus_per_task", -1, "point.gpus_per_task"),
        ("nodes", 100000, "ranks on this machine"),
        ("tasks_per_node", 10**6, "ranks on this machine"),
        ("tasks_per_node", 10**9, "more than"),
    ],
)
def test_launch_spec_point_that_cannot_run_is_refused(field, value, needle, tmp_path):
    spec = {
        "point": {**GOOD_POINT, field: value},
        "run_config": {"data": {"source": "tokens"}},
        "launch": {},
    }
    rc, out, err = scalelab_main(
        "launch", "--spec", json.dumps(spec), "--out", tmp_path / "r", "--dry-run"
    )
    assert needle in one_line(rc, err, "launch", 2)
    assert out == "" and not (tmp_path / "r").exists()


def test_launch_spec_launch_section_is_checked(tmp_path):
    spec = {
        "point": GOOD_POINT,
        "run_config": {"data": {"source": "tokens"}},
        "launch": {"cpus_per_task": 0},
    }
    rc, _, err = scalelab_main(
        "launch", "--spec", json.dumps(spec), "--out", tmp_path / "r", "--dry-run"
    )
    assert "launch.cpus_per_task" in one_line(rc, err, "launch", 2)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tasks-per-node", "0"], "--tasks-per-node"),
        (["--tasks-per-node", "-2"], "--tasks-per-node"),
        (["--nodes", "100000"], "--nodes"),
        (["--nodes", "0"], "--nodes"),
        (["--gpus-per-task", "-1"], "--gpus-per-task"),
        (["--cpus-per-task", "0"], "cpus_per_task"),
    ],
)
def test_launch_generic_layout_flags_are_checked(flags, needle):
    rc, out, err = scalelab_main("launch", *flags, "--dry-run", "--", "doctor")
    assert needle in one_line(rc, err, "launch", 2)
    assert out == ""


def test_local_multi_node_points_are_bounded_by_ranks_not_refused():
    """Outside Slurm, N nodes x T tasks run N x T ranks here (a multi-node study's local
    reference); only a rank count this machine cannot start is refused. Inside an
    allocation Slurm bounds it."""
    launcher.check_point(study_plan.RunPoint("ddp", "strong", 2, 1, 0, 0), str, env={})
    huge = study_plan.RunPoint("ddp", "strong", 100000, 1, 0, 0)
    with pytest.raises(UsageError, match="ranks on this machine"):
        launcher.check_point(huge, str, env={})
    launcher.check_point(huge, str, env={"SLURM_JOB_ID": "1"})
