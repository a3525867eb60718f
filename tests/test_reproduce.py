"""`scalelab reproduce`, `runs` and `diff` on real runs (2 ranks under mpirun, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_support import MPIRUN, PY, TINY, TRAIN, deep_update, ok, run, write_config

SCALELAB = [PY, "-m", "scalelab"]
DETERMINISTIC = deep_update(TINY, {"train": {"deterministic": True}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One deterministic 2-rank run shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "run.yaml", DETERMINISTIC)
    out = tmp / "run"
    ok(run([*MPIRUN, PY, *TRAIN, "--config", str(cfg), "--out", str(out)], timeout=180))
    return out


def test_reproduce_gives_bitwise_identical_weights_and_metrics(reference, tmp_path):
    rerun = tmp_path / "rerun"
    proc = ok(run([*SCALELAB, "reproduce", str(reference), "--out", str(rerun)], timeout=240))
    assert "reproduced" in proc.stdout
    # Same launcher and layout as recorded.
    assert "mpirun -n 2" in proc.stdout
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(rerun / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (reference, rerun))
    for key in ("train_loss", "val_loss", "val_acc", "global_steps"):
        assert sa[key] == sb[key], key
    report = json.loads((rerun / "reproduce.json").read_text())
    assert report["mode"] == "bitwise" and report["weights_equal"] and report["metrics_equal"]
    # The rerun has its own manifest, with the same provenance id.
    ma, mb = (json.loads((d / "provenance.json").read_text()) for d in (reference, rerun))
    assert ma["provenance_id"] == mb["provenance_id"]
    assert mb["must_match"]["world_size"] == 2 and mb["must_match"]["launcher"] == "openmpi"


def test_reproduce_refuses_a_different_torch_and_names_it(reference, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(reference, run_dir)
    path = run_dir / "provenance.json"
    manifest = json.loads(path.read_text())
    manifest["must_match"]["versions"]["torch"] = "2.12.0"
    manifest["must_match"]["world_size"] = 3
    path.write_text(json.dumps(manifest))
    out = tmp_path / "rerun"
    proc = run([*SCALELAB, "reproduce", str(run_dir), "--out", str(out)], timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "versions.torch: '2.12.0' (recorded) != " in proc.stderr
    # the claimed layout is checked against what the run detected, not against itself
    assert "world_size: 3 (recorded) != 2 (the run's run_info.json)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab reproduce: error: ")
    assert "--force" in proc.stderr.splitlines()[-1]
    assert not out.exists()  # refused before anything was written
    forced = ok(
        run(
            [*SCALELAB, "reproduce", str(run_dir), "--out", str(out), "--force", "--dry-run"],
            timeout=120,
        )
    )
    assert "mpirun -n 3" in forced.stdout and not out.exists()


def _edit_manifest(reference: Path, target: Path, change) -> Path:
    shutil.copytree(reference, target)
    path = target / "provenance.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return target


def test_reproduce_refuses_a_layout_the_run_did_not_have(reference, tmp_path):
    """Issue 23: reproduce compared the layout fields with themselves, so a run whose
    provenance.json claims another world size still "reproduced"."""
    run_dir = _edit_manifest(
        reference, tmp_path / "run", lambda m: m["must_match"].update(world_size=3)
    )
    out = tmp_path / "rerun"
    proc = run([*SCALELAB, "reproduce", str(run_dir), "--out", str(out)], timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scalelab reproduce: error: ") and "1 must-match field(s)" in last
    assert "world_size: 3 (recorded) != 2 (the run's run_info.json)" in last
    assert not out.exists()


def test_reproduce_checks_the_layout_the_rerun_really_had(reference, tmp_path):
    """A claim consistent in provenance.json and run_info.json (2 ranks, started as a
    single process) is found when the rerun detects 1 rank: the rerun's own manifest is
    compared with the recorded layout, and reproduce fails."""

    def single(m):
        m["must_match"].update(launcher="single")

    run_dir = _edit_manifest(reference, tmp_path / "run", single)
    info = json.loads((run_dir / "run_info.json").read_text())
    info["layout"]["launcher"] = "single"
    (run_dir / "run_info.json").write_text(json.dumps(info))
    out = tmp_path / "rerun"
    proc = run([*SCALELAB, "reproduce", str(run_dir), "--out", str(out)], timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        "did not run at the recorded layout: world_size: 2 (recorded) != 1 (the rerun)" in last
    ), last
    assert "scalelab reproduce: reproduced" not in proc.stdout


def test_reproduce_names_the_config_key_that_was_edited(reference, tmp_path):
    """Issue 23: an edited config inside provenance.json was refused naming only
    config_sha256; now the first line names the key."""
    run_dir = _edit_manifest(
        reference, tmp_path / "run", lambda m: m["config"]["optim"].update(lr=0.5)
    )
    proc = run(
        [*SCALELAB, "reproduce", str(run_dir), "--out", str(tmp_path / "rerun")], timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "first: config.optim.lr: " in last and "!= 0.5 (provenance.json)" in last


def test_reproduce_detects_results_that_differ(reference, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    state = torch.load(other / "model.pt", weights_only=True)
    name = next(iter(state))
    state[name].view(-1)[0] += 1e-7  # one ulp-sized change in one tensor
    torch.save(state, other / "model.pt")
    proc = run([*SCALELAB, "reproduce", str(reference), "--compare-only", str(other)])
    assert proc.returncode == 1
    assert f"{name}: max |diff|" in proc.stdout and "1 tensor(s)" in proc.stderr


def test_reproduce_bad_input_is_one_line(tmp_path):
    proc = run([*SCALELAB, "reproduce", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no provenance manifest" in proc.stderr


def test_runs_and_diff(reference, tmp_path):
    cfg = write_config(tmp_path / "lr.yaml", deep_update(DETERMINISTIC, {"optim": {"lr": 0.01}}))
    other = tmp_path / "runs" / "lr"
    ok(run([PY, *TRAIN, "--config", str(cfg), "--out", str(other)], timeout=120))
    rows = json.loads(
        ok(run([*SCALELAB, "runs", "--json", str(reference), str(tmp_path / "runs")])).stdout
    )
    assert [r["run"] for r in rows] == [str(reference), str(other)]
    assert [r["world_size"] for r in rows] == [2, 1]
    assert rows[0]["provenance_id"] != rows[1]["provenance_id"]
    assert all(r["status"] == "completed" and r["train_loss"] > 0 for r in rows)
    table = ok(run([*SCALELAB, "runs", str(reference)])).stdout
    assert rows[0]["provenance_id"] in table and "completed" in table

    diff = json.loads(ok(run([*SCALELAB, "diff", str(reference), str(other), "--json"])).stdout)
    assert {"field": "optim.lr", "a": 0.05, "b": 0.01} in diff["config"]
    fields = {r["field"] for r in diff["environment"]}
    assert {"world_size", "launcher", "config_sha256"} <= fields
    assert "versions.torch" not in fields
    assert "train_loss" in {r["field"] for r in diff["results"]}
    text = ok(run([*SCALELAB, "diff", str(reference), str(other)])).stdout
    assert "optim.lr: 0.05 -> 0.01" in text
