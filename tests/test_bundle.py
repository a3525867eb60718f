"""`scalelab export` / `scalelab import`: a study handed to a collaborator, for real.

A study (the shipped workflow files + a deterministic 2-rank run under mpirun) is
exported, imported into a fresh directory, and its run is rerun there with
`scalelab reproduce`: bitwise-identical weights. A bundle with one changed byte is
rejected, naming the file, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from train_support import MPIRUN, PY, TINY, TRAIN, deep_update, ok, run, write_config

SCALELAB = [PY, "-m", "scalelab"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from test_workflow import copy_workflow

    tmp = tmp_path_factory.mktemp("bundle")
    study = copy_workflow(tmp / "study")
    cfg = write_config(tmp / "run.yaml", deep_update(TINY, {"train": {"deterministic": True}}))
    ok(run([*MPIRUN, PY, *TRAIN, "--config", str(cfg), "--out",
            str(study / "results" / "runs" / "tiny")], timeout=180))
    out = tmp / "bundle"
    proc = ok(run([*SCALELAB, "export", str(study), "--out", str(out)], timeout=300))
    assert "1 run(s)" in proc.stdout
    return out


def test_bundle_holds_workflow_lock_wheel_results_and_manifests(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    files = meta["files"]
    for rel in ("study/Snakefile", "study/config/config.yaml", "study/profiles/slurm/config.yaml",
                "envs/lock-cpu.txt", "envs/lock-cuda.txt", "envs/lock-horovod.txt",
                "study/results/runs/tiny/provenance.json", "study/results/runs/tiny/model.pt",
                meta["wheel"]):
        assert rel in files, rel
    assert meta["wheel"].startswith("dist/scalelab-") and meta["wheel"].endswith(".whl")
    assert meta["runs"][0]["run"] == "study/results/runs/tiny"
    # The inventory checks with the standard tool too.
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len((bundle / "SHA256SUMS").read_text().splitlines()) == len(files)


def test_import_then_reproduce_gives_the_same_weights(bundle, tmp_path):
    study = tmp_path / "colleague"
    ok(run([*SCALELAB, "import", str(bundle), "--out", str(study)], timeout=120))
    run_dir = study / "results" / "runs" / "tiny"
    assert (run_dir / "provenance.json").is_file() and (study / "Snakefile").is_file()
    rerun = tmp_path / "rerun"
    proc = ok(run([*SCALELAB, "reproduce", str(run_dir), "--out", str(rerun)], timeout=240))
    assert "reproduced" in proc.stdout
    report = json.loads((rerun / "reproduce.json").read_text())
    assert report["mode"] == "bitwise" and report["weights_equal"] and report["metrics_equal"]


def test_one_changed_byte_is_rejected_naming_the_file(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "study" / "results" / "runs" / "tiny" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = tmp_path / "study"
    proc = run([*SCALELAB, "import", str(copy), "--out", str(out)], timeout=120)
    assert proc.returncode == 1
    assert "study/results/runs/tiny/model.pt: sha256 mismatch" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab import: error: ")
    assert not out.exists()
    # A file slipped in, or one removed, is named too.
    target.write_bytes(bundle.joinpath("study/results/runs/tiny/model.pt").read_bytes())
    (copy / "study" / "extra.py").write_text("print('hi')\n")
    (copy / "envs" / "lock-cpu.txt").unlink()
    proc = run([*SCALELAB, "import", str(copy), "--check"], timeout=120)
    assert proc.returncode == 1
    assert "study/extra.py: not in the inventory" in proc.stderr
    assert "envs/lock-cpu.txt: missing" in proc.stderr


def test_export_refuses_to_write_into_the_study_or_a_foreign_directory(bundle, tmp_path):
    study = tmp_path / "s"
    (study / "results").mkdir(parents=True)
    (study / "Snakefile").write_text("")
    proc = run([*SCALELAB, "export", str(study), "--out", str(study / "results" / "b")])
    assert proc.returncode == 2 and "lies inside STUDY" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (study / "results" / "b").exists()
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    proc = run([*SCALELAB, "export", str(study), "--out", str(foreign)])
    assert proc.returncode == 2 and "refusing to replace it" in proc.stderr
    assert (foreign / "chapter1.tex").read_text() == "keep me"
