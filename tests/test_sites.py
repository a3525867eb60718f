"""`scalelab site record` and `scalelab site check` on real runs: a tiny config trained
twice on one rank and once on two (mpirun), recorded as this machine's reference, then
checked against it, against a reference from a site three times faster, against one from
another torch, and with a run of another workload."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from conftest import scalelab_main
from train_support import MPIRUN, PY, TINY, TRAIN, deep_update, ok, run, write_config

from scalelab.rundir import RunDir


def train(cfg: dict, out: Path, ranks: int) -> Path:
    config = write_config(out.parent / f"{out.name}.yaml", cfg)
    launcher = [*MPIRUN, PY] if ranks == 2 else [PY]
    ok(run([*launcher, *TRAIN, "--config", str(config), "--out", str(out)], timeout=240))
    return out


#: Four steps after the warm-up step: a throughput to compare.
CFG = deep_update(TINY, {"train": {"epochs": 1}, "data": {"num_samples": 160}})


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "runs"
    root.mkdir()
    for name, ranks in (("one-r0", 1), ("one-r1", 1), ("two-r0", 2)):
        train(CFG, root / name, ranks)
    return root


@pytest.fixture(scope="module")
def reference(study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "here.yaml"
    code, said, err = scalelab_main("site", "record", study, "--site", "here", "--out", out)
    assert code == 0 and "2 point(s)" in said, err
    return out


def throughput(run_dir: Path) -> float:
    return float(RunDir(run_dir).summary()["samples_per_s"])


def test_record_keeps_each_points_repeats_environment_and_hardware(study, reference):
    ref = yaml.safe_load(reference.read_text())
    assert ref["format"] == "scalelab-site-reference" and ref["site"] == "here"
    assert ref["environment"]["versions.torch"] == torch.__version__
    assert "versions.horovod" not in ref["environment"]  # it decides no run of this study
    assert ref["hardware"]["cpu_count"] > 0
    by_ranks = {p["layout"]["ranks"]: p for p in ref["points"]}
    assert set(by_ranks) == {1, 2}
    one = by_ranks[1]["throughput"]
    measured = sorted(throughput(study / n) for n in ("one-r0", "one-r1"))
    assert (one["low"], one["high"], one["repeats"]) == (measured[0], measured[1], 2)
    assert one["low"] <= one["median"] <= one["high"]
    assert by_ranks[2]["throughput"]["median"] == throughput(study / "two-r0")
    assert by_ranks[1]["workload"] == by_ranks[2]["workload"]  # one workload, two layouts
    assert by_ranks[1]["layout"]["backend"] != by_ranks[2]["layout"]["backend"]


def test_a_study_checked_against_its_own_reference_is_within_it(study, reference, tmp_path):
    table = tmp_path / "check.csv"
    code, said, err = scalelab_main(
        "site", "check", study, "--reference", reference, "--csv", table
    )
    assert code == 0, err
    assert "all 3 matched run(s) within here's reference" in said
    rows = list(csv.DictReader(table.open()))
    assert {r["verdict"] for r in rows} == {"ok"} and len(rows) == 3


def test_a_site_three_times_faster_flags_the_slow_points_in_one_line(study, reference, tmp_path):
    ref = yaml.safe_load(reference.read_text())
    for point in ref["points"]:
        if point["layout"]["ranks"] == 1:
            fig = point["throughput"]
            # three times faster than the fastest repeat here, whatever the repeats' spread
            # on a loaded machine
            factor = 3 * fig["high"] / fig["low"]
            for k in ("median", "low", "high"):
                fig[k] *= factor
    faster = tmp_path / "faster.yaml"
    faster.write_text(yaml.safe_dump(ref))
    table = tmp_path / "check.csv"
    code, said, err = scalelab_main("site", "check", study, "--reference", faster, "--csv", table)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "2 of 3 run(s) outside here's reference" in lines[0]
    assert "one-r0 slow" in lines[0] and "one-r1 slow" in lines[0]
    rows = {Path(r["run"]).name: r for r in csv.DictReader(table.open())}
    median = next(p for p in ref["points"] if p["layout"]["ranks"] == 1)["throughput"]["median"]
    for name in ("one-r0", "one-r1"):
        assert rows[name]["verdict"] == "slow"
        assert float(rows[name]["ratio"]) == pytest.approx(throughput(study / name) / median)
    assert rows["two-r0"]["verdict"] == "ok"


def test_another_environment_is_refused_unless_allowed(study, reference, tmp_path):
    ref = yaml.safe_load(reference.read_text())
    ref["environment"]["versions.torch"] = "2.12.0"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(ref))
    code, _, err = scalelab_main("site", "check", study, "--reference", other)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "versions.torch: '2.12.0' (reference)" in lines[0]
    code, said, err = scalelab_main(
        "site", "check", study, "--reference", other, "--allow-other-environment"
    )
    assert code == 0 and "environment differs: versions.torch" in err, err


def test_another_workload_has_no_reference_point(reference, tmp_path):
    wider = deep_update(CFG, {"model": {"options": {"width": 12}}})
    alone = train(wider, tmp_path / "wide", 1)
    code, said, err = scalelab_main("site", "check", alone, "--reference", reference)
    assert code == 2 and "none of the 1 run(s) has a reference point" in err, err
    assert "no reference" in said


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r.pop("site"), "field 'site': Field required"),
        (lambda r: r["points"][0]["throughput"].update(median=-1), "points.0.throughput.median"),
        (lambda r: r.update(format="other"), "not a scalelab-site-reference file"),
        (lambda r: r.update(version=9), "field 'version': 9, expected 1"),
    ],
)
def test_a_bad_reference_file_is_one_line_naming_the_field(
    study, reference, tmp_path, change, words
):
    ref = yaml.safe_load(reference.read_text())
    change(ref)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ref))
    code, _, err = scalelab_main("site", "check", study, "--reference", bad)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and words in lines[0], err


def test_record_refuses_an_empty_folder(tmp_path):
    code, _, err = scalelab_main("site", "record", tmp_path, "--site", "x", "--out", tmp_path / "r")
    assert code == 2 and "no run directories" in err and not (tmp_path / "r").exists()
