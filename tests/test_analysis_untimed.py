"""A run without timed steps (summary.json ``samples_per_s: null``) beside good ones:
`analyze` and `predict` write everything, the run is a flagged row, not an error.

The runs are real trainer runs: the untimed one has one step per epoch and a warm-up of
two steps, so the warm-up takes the only step of both epochs (issue 24: weak scaling at 8
ranks on a small dataset)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import VENV_BIN, mpirun, run

SCALELAB = str(VENV_BIN / "scalelab")
TRAIN = [
    "train",
    "--set",
    "train.epochs=2",
    "--set",
    "train.steps_per_epoch=4",
    "--set",
    "data.num_samples=512",
    "--set",
    "data.val_samples=64",
    "--set",
    "optim.per_rank_batch_size=16",
    "--set",
    "train.threads=1",
    "--set",
    "metrics.warmup_steps=1",
]
#: the only step of each epoch is a warm-up step: no step is timed
UNTIMED = ["--set", "train.steps_per_epoch=1", "--set", "metrics.warmup_steps=2"]
FLAG = "no timed steps"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """runs/: single (1 rank), ddp2 (2 ranks), hvd2 (2 ranks Horovod, untimed);
    single_untimed/: a 1-rank run without timed steps (a baseline without throughput)."""
    root = tmp_path_factory.mktemp("untimed")
    runs = root / "runs"
    run([SCALELAB, *TRAIN, "--out", str(runs / "single")], timeout=120)
    mpirun(
        2, [SCALELAB, *TRAIN, "--set", "dist.backend=ddp", "--out", str(runs / "ddp2")], timeout=120
    )
    mpirun(
        2,
        [SCALELAB, *TRAIN, *UNTIMED, "--set", "dist.backend=horovod", "--out", str(runs / "hvd2")],
        timeout=120,
    )
    run([SCALELAB, *TRAIN, *UNTIMED, "--out", str(root / "single_untimed")], timeout=120)
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_trainer_really_writes_a_null_throughput(study):
    assert summary(study / "runs" / "hvd2")["samples_per_s"] is None
    assert summary(study / "single_untimed")["samples_per_s"] is None
    assert summary(study / "runs" / "ddp2")["samples_per_s"] > 0


def test_analyze_writes_everything_and_flags_the_untimed_row(study, tmp_path):
    out = tmp_path / "out"
    proc = run([SCALELAB, "analyze", str(study / "runs"), "--out", str(out)])
    assert "1 run(s) without timed steps" in proc.stdout
    for name in (
        "runs.csv",
        "runs.parquet",
        "scaling.csv",
        "scaling.parquet",
        "fits.csv",
        "scaling.md",
        "scaling.html",
        "analysis.json",
        "plots/fits.png",
        "plots/efficiency.svg",
    ):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "runs.csv", keep_default_na=False).set_index("run_id")
    assert runs.loc["hvd2", "flags"] == FLAG and runs.loc["hvd2", "samples_per_s"] == ""
    assert runs.loc["ddp2", "flags"] == "" and float(runs.loc["ddp2", "samples_per_s"]) > 0
    t = pd.read_csv(out / "scaling.csv").set_index(["backend", "ranks"])
    bad = t.loc[("horovod", 2)]
    assert bad["flag_no_timed_steps"] and FLAG in bad["flags"]
    assert (bad["untimed_runs"], bad["repeats"]) == (1, 0)
    assert math.isnan(bad["throughput"]) and math.isnan(bad["efficiency"])
    # the rest is computed as before: ddp's 2-rank point against the shared 1-rank baseline
    good = t.loc[("ddp", 2)]
    assert good["efficiency"] == pytest.approx(
        good["throughput"] / (2 * t.loc[("ddp", 1), "throughput"])
    )
    assert not t.loc[("ddp", 2), "flag_no_timed_steps"]
    md, page = (out / "scaling.md").read_text(), (out / "scaling.html").read_text()
    assert "- (no timed steps)" in md and f"- {FLAG} (1 of 4 rows):" in md
    assert f"<li>{FLAG} (1 of 4 rows):" in page
    assert FLAG in "".join(json.loads((out / "analysis.json").read_text())["flags"])
    fits = pd.read_csv(out / "fits.csv").set_index("backend")
    assert fits.loc["horovod", "fit_points"] == 1  # the untimed point is not fitted
    assert math.isnan(fits.loc["horovod", "amdahl_parallel_fraction"])
    assert fits.loc["ddp", "fit_points"] == 2


def test_a_baseline_without_throughput_says_so(study, tmp_path):
    out = tmp_path / "out"
    run(
        [
            SCALELAB,
            "analyze",
            str(study / "single_untimed"),
            str(study / "runs" / "ddp2"),
            "--out",
            str(out),
        ]
    )
    t = pd.read_csv(out / "scaling.csv").set_index(["backend", "ranks"])
    assert t.loc[("ddp", 1), "flags"] == FLAG
    point = t.loc[("ddp", 2)]
    assert point["flags"] == "no baseline" and math.isnan(point["efficiency"])
    assert point["throughput"] > 0  # its own measurement is kept
    assert "- (no baseline)" in (out / "scaling.md").read_text()


@pytest.fixture(scope="module")
def commbench(study) -> Path:
    cb = study / "cb"
    mpirun(
        2,
        [
            SCALELAB,
            "commbench",
            "--lib",
            "mpi4py",
            "--ops",
            "allreduce",
            "--min-bytes",
            "4K",
            "--max-bytes",
            "4M",
            "--factor",
            "4",
            "--iters",
            "5",
            "--warmup",
            "2",
            "--out",
            str(cb),
        ],
        timeout=120,
    )
    return cb


def test_predict_skips_the_untimed_run_with_one_warning(study, commbench, tmp_path):
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(commbench),
            "--run",
            str(study / "runs" / "single"),
            "--measured",
            str(study / "runs"),
            "--backend",
            "horovod",
            "--max-nodes",
            "2",
            "--ranks-per-node",
            "2",
            "--out",
            str(out),
        ]
    )
    warnings = [line for line in proc.stderr.splitlines() if "hvd2" in line]
    assert len(warnings) == 1 and warnings[0].startswith("scalelab predict: warning:")
    assert FLAG in warnings[0] and "error" not in proc.stderr
    for name in (
        "prediction.csv",
        "prediction.json",
        "prediction.md",
        "errors.csv",
        "prediction.png",
    ):
        assert (out / name).is_file(), name
    assert list(pd.read_csv(out / "errors.csv")["ranks"]) == [1]


def test_predict_from_an_untimed_base_is_one_line(study, commbench, tmp_path):
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(commbench),
            "--run",
            str(study / "single_untimed"),
            "--out",
            str(out),
        ],
        check=False,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("scalelab predict: error: --run ")
    assert FLAG in err[-1] and "--compute-time" in err[-1] and not out.exists()
