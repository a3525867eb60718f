"""The workflow with containers enabled, checked with STAND-INS for srun and apptainer.

No Apptainer can be installed on these machines, so `srun` and `apptainer` here are
the recording stand-ins of tests/container_standin.py: they write down their
arguments and do nothing else. What is tested is exactly what would be run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml
from conftest import REPO, tool_env
from container_standin import make_standins, read_log
from test_workflow import copy_workflow, snakemake


def _setup(tmp_path: Path, sha: str | None = None, standins=("apptainer", "srun")):
    wd = copy_workflow(tmp_path / "wf")
    image = tmp_path / "scalelab-cpu.sif"
    image.write_bytes(b"not a real image: stand-in bytes for the sha256 check\n")
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp"], nodes=[2], tasks_per_node=[1])
    cfg["commbench"] = {"enabled": False}
    cfg["container"] = {"enabled": True, "image": str(image), "nv": False,
                        "sha256": sha or hashlib.sha256(image.read_bytes()).hexdigest()}
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    bindir = make_standins(tmp_path / "standin-bin", standins)
    log = tmp_path / "standin.log"
    env = tool_env({"STANDIN_LOG": str(log)})
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    return wd, image, env, log


def test_training_ranks_enter_the_image_inside_srun(tmp_path):
    wd, image, env, log = _setup(tmp_path)
    env["SLURM_JOB_ID"] = "4242"  # as inside the batch job the slurm executor submits
    target = "results/runs/ddp-strong-n2-t1-g0-r0/summary.json"
    proc = snakemake(wd, [target, "--cores", "2", "--configfile", "c.yaml"], env=env,
                     check=False)
    # The stand-in srun ran nothing, so the run has no summary and the job fails.
    assert proc.returncode != 0
    calls = read_log(log)
    srun = [c for c in calls if c["prog"] == "srun"]
    assert len(srun) == 1, calls
    argv = srun[0]["argv"]
    i = argv.index("apptainer")
    assert argv[:i] == ["--mpi=pmix", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--cpus-per-task=1", "--kill-on-bad-exit=1"]
    inner = argv[i:]
    assert inner[:2] == ["apptainer", "exec"]
    assert str(image) in inner and "--nv" not in inner
    j = inner.index(str(image))
    assert inner[j + 1:j + 3] == ["scalelab", "train"]
    assert inner[-1] == "--resume"
    # The image's identity is recorded with the run.
    recorded = (wd / "results" / "runs" / "ddp-strong-n2-t1-g0-r0" / "container.json").read_text()
    assert hashlib.sha256(image.read_bytes()).hexdigest() in recorded


def test_digest_mismatch_stops_before_any_job(tmp_path):
    wd, _, env, log = _setup(tmp_path, sha="0" * 64)
    proc = snakemake(wd, ["--cores", "1", "--configfile", "c.yaml"], env=env, check=False)
    assert proc.returncode != 0
    assert "sha256 mismatch" in proc.stderr
    assert not (wd / "results").exists() and read_log(log) == []


def test_missing_image_and_missing_runtime_stop_before_any_job(tmp_path):
    wd, image, env, log = _setup(tmp_path, standins=("srun",))
    proc = snakemake(wd, ["-n", "--configfile", "c.yaml"], env=env, check=False)
    assert proc.returncode != 0 and "no apptainer or singularity" in proc.stdout + proc.stderr
    wd2, image2, env2, _ = _setup(tmp_path / "second")
    image2.unlink()
    proc = snakemake(wd2, ["-n", "--configfile", "c.yaml"], env=env2, check=False)
    assert proc.returncode != 0 and str(image2) in proc.stdout + proc.stderr
    assert not (wd / "results").exists() and not (wd2 / "results").exists()
