"""Every command's error paths: one ``scalelab CMD: error:`` line, no traceback, and the
exit code of the convention (0 ok, 1 a check or run failed, 2 bad usage or config,
75 stopped after a checkpoint). Most cases run in-process through the real entry point;
the full-disk cases run real processes on a small tmpfs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scalelab_main
from reliability import tally_fixtures
from train_support import TINY, env, write_config

from scalelab import cli
from scalelab.errors import EXIT_CODES_HELP

NOT_UTF8 = b"ranks,throughput\n1,\xff\xfe100\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    return scalelab_main(*argv)


def assert_one_line(rc: int, err: str, command: str, code: int) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"scalelab {command}: error: "), lines[0]
    assert rc == code, (rc, err)
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    good = root / "good.csv"
    good.write_text("ranks,throughput\n1,100\n2,190\n")
    bad = root / "latin1.csv"
    bad.write_bytes(NOT_UTF8)
    cfg = root / "latin1.yaml"
    cfg.write_bytes(b"seed: 1\nmodel:\n  name: cnn # caf\xe9\n")
    afile = root / "a-file"
    afile.write_text("x")
    tiny = write_config(root / "tiny.yaml", TINY)
    empty_npz = root / "empty.npz"
    empty_npz.write_bytes(b"")
    not_a_lock = root / "notes.yaml"  # YAML, but a scalar: not a lock file
    not_a_lock.write_text("just some notes\n")
    control = root / "control.yaml"  # a control character: YAML's reader refuses it
    control.write_bytes(b"seed: 1\x03\n")
    not_dataset = root / "not-a-dataset"
    not_dataset.mkdir()
    (not_dataset / "notes.txt").write_text("x")
    point = {
        "backend": "ddp",
        "mode": "strong",
        "nodes": -1,
        "tasks_per_node": 1,
        "gpus_per_task": 0,
        "repeat": 0,
    }
    negative_nodes = json.dumps(
        {"point": point, "run_config": {"data": {"source": "tokens"}}, "launch": {}}
    )
    return {
        "root": root,
        "good": good,
        "bad": bad,
        "cfg": cfg,
        "afile": afile,
        "tiny": tiny,
        "empty_npz": empty_npz,
        "not_a_lock": not_a_lock,
        "not_dataset": not_dataset,
        "negative_nodes": negative_nodes,
        "control": control,
    }


CASES = [
    # (id, argv with {placeholders}, command shown, exit code, text the line must contain)
    ("no-command-args", ["analyze"], "analyze", 2, "--out"),
    ("unknown-flag", ["evaluate", "--bogus"], "evaluate", 2, "--help"),
    ("analyze-nothing", ["analyze", "--out", "{root}/a1"], "analyze", 2, "RUN_DIR"),
    (
        "analyze-missing-csv",
        ["analyze", "--from-csv", "{root}/nope.csv", "--out", "{root}/a2"],
        "analyze",
        2,
        "nope.csv",
    ),
    (
        "analyze-not-utf8",
        ["analyze", "--from-csv", "{bad}", "--out", "{root}/a3"],
        "analyze",
        2,
        "UTF-8",
    ),
    (
        "analyze-out-is-file",
        ["analyze", "--from-csv", "{good}", "--out", "{afile}"],
        "analyze",
        2,
        "not a directory",
    ),
    (
        "analyze-out-under-proc",
        ["analyze", "--from-csv", "{good}", "--out", "/proc/scalelab-nowhere/out"],
        "analyze",
        2,
        "/proc",
    ),
    (
        "analyze-threshold",
        ["analyze", "--from-csv", "{good}", "--threshold", "7", "--out", "{root}/a4"],
        "analyze",
        2,
        "--threshold",
    ),
    (
        "evaluate-batch-0",
        ["evaluate", "--run", "{root}", "--data", "{root}", "--batch-size", "0"],
        "evaluate",
        2,
        "--batch-size",
    ),
    (
        "evaluate-no-run",
        ["evaluate", "--run", "{root}/none", "--data", "{root}"],
        "evaluate",
        2,
        "missing",
    ),
    ("launch-spec-empty", ["launch", "--spec", "{{}}", "--out", "{root}/r1"], "launch", 2, "point"),
    ("launch-spec-list", ["launch", "--spec", "[]", "--out", "{root}/r1"], "launch", 2, "object"),
    (
        "launch-spec-not-json",
        ["launch", "--spec", "nope", "--out", "{root}/r1"],
        "launch",
        2,
        "JSON",
    ),
    ("launch-no-spec", ["launch", "--out", "{root}/r1"], "launch", 2, "--spec"),
    ("train-no-out", ["train", "--config", "{tiny}"], "train", 2, "--out"),
    (
        "train-config-not-utf8",
        ["train", "--config", "{cfg}", "--out", "{root}/t1"],
        "train",
        2,
        "UTF-8",
    ),
    (
        "train-config-missing",
        ["train", "--config", "{root}/none.yaml", "--out", "{root}/t2"],
        "train",
        2,
        "none.yaml",
    ),
    (
        "train-out-is-file",
        ["train", "--config", "{tiny}", "--out", "{afile}"],
        "train",
        2,
        "not a directory",
    ),
    ("data-stage-no-source", ["data", "stage", "--out", "{root}/d1"], "data", 2, "--source"),
    (
        "data-stage-out-is-file",
        [
            "data",
            "stage",
            "--source",
            "synthetic",
            "--num-samples",
            "64",
            "--out",
            "{afile}",
            "--force",
        ],
        "data",
        2,
        "not a directory",
    ),
    ("data-verify-missing", ["data", "verify", "{root}/none"], "data", 2, "none"),
    (
        "data-stage-bad-split",
        ["data", "stage", "--source", "synthetic", "--split", "0.5,x,0", "--out", "{root}/d2"],
        "data",
        2,
        "--split",
    ),
    (
        "commbench-bad-ops",
        ["commbench", "--lib", "torch", "--ops", "gather", "--out", "{root}/c1"],
        "commbench",
        2,
        "--ops",
    ),
    (
        "commbench-out-is-file",
        ["commbench", "--lib", "torch", "--out", "{afile}"],
        "commbench",
        2,
        "not a directory",
    ),
    (
        "predict-not-utf8",
        [
            "predict",
            "--commbench",
            "{bad}",
            "--compute-time",
            "1",
            "--grad-bytes",
            "1M",
            "--global-batch",
            "8",
            "--out",
            "{root}/p1",
        ],
        "predict",
        2,
        "UTF-8",
    ),
    (
        "predict-missing",
        [
            "predict",
            "--commbench",
            "{root}/none.csv",
            "--compute-time",
            "1",
            "--grad-bytes",
            "1M",
            "--global-batch",
            "8",
            "--out",
            "{root}/p2",
        ],
        "predict",
        2,
        "none.csv",
    ),
    ("doctor-bad-mode", ["doctor", "--mode", "cloud"], "doctor", 2, "cloud"),
    ("container-no-image", ["container", "verify"], "container", 2, "IMAGE"),
    ("testcluster-bad-action", ["testcluster", "explode"], "testcluster", 2, "explode"),
    # issue 23, the hostile probe's CLI inputs: each was a traceback, accepted, or exit 1
    (
        "data-stage-num-samples-1e12",
        [
            "data",
            "stage",
            "--source",
            "synthetic",
            "--num-samples",
            "1000000000000",
            "--out",
            "{root}/d3",
        ],
        "data",
        2,
        "--num-samples",
    ),
    (
        "data-stage-one-class",
        ["data", "stage", "--source", "synthetic", "--num-classes", "1", "--out", "{root}/d4"],
        "data",
        2,
        "--num-classes",
    ),
    (
        "data-stage-image-side-huge",
        [
            "data",
            "stage",
            "--source",
            "synthetic",
            "--image-size",
            "100000",
            "100000",
            "--out",
            "{root}/d5",
        ],
        "data",
        2,
        "--image-size",
    ),
    (
        "data-stage-empty-npz",
        ["data", "stage", "--source", "npz", "--path", "{empty_npz}", "--out", "{root}/d6"],
        "data",
        2,
        "empty.npz",
    ),
    (
        "data-verify-not-a-dataset",
        ["data", "verify", "{not_dataset}"],
        "data",
        2,
        "not a staged dataset",
    ),
    (
        "data-localize-reserve-nan",
        ["data", "localize", "{not_dataset}", "--reserve", "nan"],
        "data",
        2,
        "--reserve",
    ),
    (
        "data-localize-lock-timeout-nan",
        ["data", "localize", "{not_dataset}", "--lock-timeout", "nan"],
        "data",
        2,
        "--lock-timeout",
    ),
    (
        "commbench-timeout-nan",
        ["commbench", "--lib", "torch", "--timeout", "nan", "--out", "{root}/c2"],
        "commbench",
        2,
        "--timeout",
    ),
    (
        "commbench-timeout-inf",
        ["commbench", "--lib", "torch", "--timeout", "inf", "--out", "{root}/c3"],
        "commbench",
        2,
        "--timeout",
    ),
    (
        "commbench-timeout-tiny",
        ["commbench", "--lib", "torch", "--timeout", "1e-320", "--out", "{root}/c8"],
        "commbench",
        2,
        "--timeout",
    ),
    (
        "train-config-control-character",
        ["train", "--config", "{control}", "--out", "{root}/t3"],
        "train",
        2,
        "control.yaml",
    ),
    (
        "container-generate-lock-not-a-lock",
        ["container", "generate", "--lock", "{not_a_lock}", "--out", "{root}/g.def"],
        "container",
        2,
        "notes.yaml",
    ),
    (
        "container-lint-not-a-definition",
        ["container", "lint", "{afile}"],
        "container",
        1,
        "problem",
    ),
    (
        "commbench-max-bytes-beyond-memory",
        ["commbench", "--lib", "torch", "--max-bytes", "1E", "--out", "{root}/c4"],
        "commbench",
        2,
        "--max-bytes",
    ),
    (
        "commbench-iters-huge",
        ["commbench", "--lib", "torch", "--iters", "10000000000", "--out", "{root}/c5"],
        "commbench",
        2,
        "--iters",
    ),
    (
        "predict-max-fit-bytes-nan",
        [
            "predict",
            "--commbench",
            "{good}",
            "--compute-time",
            "1",
            "--max-fit-bytes",
            "nan",
            "--global-batch",
            "8",
            "--out",
            "{root}/p3",
        ],
        "predict",
        2,
        "--max-fit-bytes",
    ),
    (
        "container-lock-not-a-lock",
        ["container", "lock", "--lock", "{not_a_lock}"],
        "container",
        2,
        "notes.yaml",
    ),
    (
        "container-lock-not-utf8",
        ["container", "lock", "--lock", "{bad}"],
        "container",
        2,
        "latin1.csv",
    ),
    (
        "launch-spec-negative-nodes",
        ["launch", "--spec", "{negative_nodes}", "--out", "{root}/r2", "--dry-run"],
        "launch",
        2,
        "point.nodes",
    ),
    (
        "launch-tasks-per-node-0",
        [
            "launch",
            "--tasks-per-node",
            "0",
            "--dry-run",
            "--",
            "commbench",
            "--lib",
            "torch",
            "--out",
            "{root}/c6",
        ],
        "launch",
        2,
        "--tasks-per-node",
    ),
    (
        "launch-local-nodes-100000",
        [
            "launch",
            "--nodes",
            "100000",
            "--dry-run",
            "--",
            "commbench",
            "--lib",
            "torch",
            "--out",
            "{root}/c7",
        ],
        "launch",
        2,
        "--nodes",
    ),
]


tally, _count = tally_fixtures(
    "error-paths",
    "error_tests_run",
    "one_line_with_the_right_code",
    commands_covered=len({c[2] for c in CASES}),
)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_is_one_line_with_the_conventions_code(case, files):
    _, argv, command, code, needle = case
    argv = [a.format(**files) for a in argv]
    rc, _, err = run_cli(argv)
    line = assert_one_line(rc, err, command, code)
    assert needle in line, line


def test_help_states_the_exit_codes():
    rc, out, _ = run_cli(["--help"])
    assert rc == 0 and " ".join(EXIT_CODES_HELP.split()) in " ".join(out.split())


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user and environment errors are one-liners: a bug must stay debuggable."""
    from scalelab import evaluate

    def broken(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(evaluate, "evaluate", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["evaluate", "--run", "x", "--data", "y"])


# ---- a full disk: real processes on a 256 KiB tmpfs --------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    assert shutil.which("mount"), "mount(8) missing: setup.sh installs util-linux"
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"cannot mount a small tmpfs (root needed): {proc.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _scalelab(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )


def test_full_disk_while_staging_is_one_line_and_leaves_nothing(small_disk):
    out = small_disk / "data"
    proc = _scalelab(
        "data",
        "stage",
        "--source",
        "synthetic",
        "--num-samples",
        "4000",
        "--image-size",
        "16",
        "16",
        "--quiet",
        "--out",
        out,
    )
    line = assert_one_line(proc.returncode, proc.stderr, "data", 1)
    assert "No space left on device" in line
    assert not out.exists()
    assert [p.name for p in small_disk.iterdir() if not p.name.endswith(".lock")] == []


def test_full_disk_while_training_is_one_line_and_not_complete(small_disk, files):
    out = small_disk / "run"
    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["options"] = {"width": 32, "hidden": 256}  # model.pt > the disk
    path = write_config(files["root"] / "big.yaml", cfg)
    proc = _scalelab("train", "--config", path, "--out", out)
    line = assert_one_line(proc.returncode, proc.stderr, "train", 1)
    assert "No space left on device" in line
    assert not (out / "summary.json").exists()


def _study_with_results(root: Path) -> Path:
    """A study directory as `export` takes it, its results larger than the small disk."""
    study = root / "study"
    (study / "results" / "runs" / "r0").mkdir(parents=True)
    (study / "Snakefile").write_text("# a study\n")
    (study / "results" / "runs" / "r0" / "weights.bin").write_bytes(b"\x01" * (1 << 20))
    return study


def test_full_disk_during_export_is_one_line_exit_1(small_disk, tmp_path):
    """issue 23: a full disk inside the copied results tree was shutil.Error -> exit 2."""
    study = _study_with_results(tmp_path)
    out = small_disk / "bundle"
    proc = _scalelab("export", study, "--out", out)
    line = assert_one_line(proc.returncode, proc.stderr, "export", 1)
    assert "No space left on device" in line
    assert not out.exists()


def test_full_disk_during_import_is_one_line_exit_1(small_disk, tmp_path):
    """issue 23: the same for `import` of a good bundle onto a full disk."""
    bundle = tmp_path / "bundle"
    proc = _scalelab("export", _study_with_results(tmp_path), "--out", bundle)
    assert proc.returncode == 0, proc.stderr
    out = small_disk / "study"
    proc = _scalelab("import", bundle, "--out", out)
    line = assert_one_line(proc.returncode, proc.stderr, "import", 1)
    assert "No space left on device" in line
    assert not out.exists()


def test_empty_validation_and_test_splits_are_refused(files, tmp_path):
    """A dataset staged with no validation or test rows: training refuses to validate on
    nothing and evaluation refuses to report an accuracy over zero samples."""
    data = tmp_path / "data"
    rc, _, err = run_cli(
        [
            "data",
            "stage",
            "--source",
            "synthetic",
            "--num-samples",
            "64",
            "--image-size",
            "8",
            "8",
            "--split",
            "1,0,0",
            "--quiet",
            "--out",
            data,
        ]
    )
    assert rc == 0, err
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"source": "staged", "path": str(data)}
    path = write_config(tmp_path / "staged.yaml", cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    line = assert_one_line(proc.returncode, proc.stderr, "train", 2)
    assert "data.val_split" in line and "empty" in line
    cfg["data"]["val_split"] = None  # train without validation, then evaluate on "test"
    path = write_config(tmp_path / "noval.yaml", cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run2"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rc, _, err = run_cli(
        ["evaluate", "--run", tmp_path / "run2", "--data", data, "--split", "test"]
    )
    line = assert_one_line(rc, err, "evaluate", 2)
    assert "no samples" in line


def test_every_error_class_carries_its_exit_code():
    """One base class carries the code; describe (and so cli.main) reads it, for every
    subclass, the stop-for-requeue one included."""
    from scalelab.errors import (
        BadInputData,
        CheckFailed,
        DataError,
        ScalelabError,
        UsageError,
        describe,
    )
    from scalelab.train.dcp_safe import UnsafeCheckpoint
    from scalelab.train.signals import EXIT_PREEMPTED, Preempted

    codes = {
        ScalelabError: 1,
        UsageError: 2,
        DataError: 1,
        CheckFailed: 1,
        BadInputData: 2,
        UnsafeCheckpoint: 1,
        Preempted: 75,
    }
    assert EXIT_PREEMPTED == 75
    for cls, code in codes.items():
        assert issubclass(cls, ScalelabError) and cls.exit_code == code
        assert describe(cls(f"{cls.__name__} happened\nsecond line")) == (
            f"{cls.__name__} happened",
            code,
        )

    class Custom(ScalelabError):
        exit_code = 9

    assert describe(Custom("x")) == ("x", 9)
    assert describe(RuntimeError("a bug")) is None
