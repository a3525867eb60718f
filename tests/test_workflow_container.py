"""The workflow with containers enabled where no real run can tell: no runtime, no image, --nv.

* A PATH stripped of apptainer (and singularity): the workflow stops before any job.
* A missing image: the same, with the real apptainer on PATH.
* `--nv` (a GPU image on GPU nodes) cannot run here: the one STAND-IN test records what
  `scalelab launch` would run and says so in its name. Everything that can run for real
  (the image, 2-node training in it, the workflow under --profile slurm-apptainer, the
  pull) is in tests/test_container_real.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import yaml
from conftest import REPO, tool_env
from container_image import require_apptainer
from container_standin import make_standins, read_log
from test_workflow import copy_workflow, snakemake


def _config(wd: Path, image: Path, **container) -> None:
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp"], nodes=[2], tasks_per_node=[1])
    cfg["commbench"] = {"enabled": False}
    cfg["container"] = {"enabled": True, "image": str(image), "nv": False, **container}
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))


def path_without_apptainer(path: str, shadow: Path) -> str:
    """PATH with every directory that holds apptainer or singularity replaced by a copy
    (symlinks) without them: bash, which and the rest stay available."""
    dirs = []
    for i, d in enumerate(p for p in path.split(os.pathsep) if p):
        if any((Path(d) / n).exists() for n in ("apptainer", "singularity")):
            copy = shadow / f"dir{i}"
            copy.mkdir(parents=True)
            for entry in Path(d).iterdir():
                if entry.name not in ("apptainer", "singularity"):
                    (copy / entry.name).symlink_to(entry)
            d = str(copy)
        dirs.append(d)
    stripped = os.pathsep.join(dirs)
    assert shutil.which("apptainer", path=stripped) is None
    assert shutil.which("singularity", path=stripped) is None
    assert shutil.which("bash", path=stripped)
    return stripped


def test_without_apptainer_on_path_nothing_is_planned(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    image = tmp_path / "scalelab-cpu.sif"
    image.write_bytes(b"bytes to hash\n")
    _config(wd, image)
    env = tool_env()
    env["PATH"] = path_without_apptainer(env["PATH"], tmp_path / "shadow")
    proc = snakemake(wd, ["-n", "--configfile", "c.yaml"], env=env, check=False)
    assert proc.returncode != 0
    assert "no apptainer or singularity on PATH" in proc.stdout + proc.stderr
    assert not (wd / "results").exists() and not (wd / ".snakemake" / "scalelab").exists()


def test_missing_image_stops_before_any_job(tmp_path):
    require_apptainer()
    wd = copy_workflow(tmp_path / "wf")
    image = tmp_path / "nowhere" / "scalelab-cpu.sif"
    _config(wd, image)
    proc = snakemake(wd, ["--cores", "1", "--configfile", "c.yaml"], check=False)
    assert proc.returncode != 0
    assert f"image not found: {image}" in proc.stdout + proc.stderr
    assert not (wd / "results").exists()


def test_STANDIN_gpu_ranks_enter_the_image_with_nv_inside_srun(tmp_path):
    """STAND-IN (no GPU here): `srun` and `apptainer` record their argv and run nothing."""
    wd = copy_workflow(tmp_path / "wf")
    image = tmp_path / "scalelab-gpu.sif"
    image.write_bytes(b"STAND-IN bytes, not a SIF: the stand-in apptainer never opens it\n")
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    _config(wd, image, nv=True, sha256=digest)
    bindir = make_standins(tmp_path / "standin-bin", ("apptainer", "srun"))
    log = tmp_path / "standin.log"
    env = tool_env({"STANDIN_LOG": str(log), "SLURM_JOB_ID": "4242"})  # as in the batch job
    env["PATH"] = f"{bindir}{os.pathsep}{path_without_apptainer(env['PATH'], tmp_path / 'shadow')}"
    target = "results/runs/ddp-strong-n2-t1-g0-r0/summary.json"
    proc = snakemake(wd, [target, "--cores", "2", "--configfile", "c.yaml"], env=env, check=False)
    assert proc.returncode != 0  # the stand-in srun trained nothing: no summary
    srun = [c for c in read_log(log) if c["prog"] == "srun"]
    # One call per attempt (the workflow retries a failed training job): all the same.
    assert srun and all(c["argv"] == srun[0]["argv"] for c in srun), read_log(log)
    argv = srun[0]["argv"]
    i = argv.index("apptainer")
    assert "--mpi=pmix" in argv[:i] and "--nodes=2" in argv[:i] and "--ntasks=2" in argv[:i]
    inner = argv[i:]
    assert inner[:2] == ["apptainer", "exec"] and "--nv" in inner
    assert f"SCALELAB_IMAGE_SHA256={digest}" in inner
    j = inner.index(str(image))
    assert inner[j + 1 : j + 3] == ["scalelab", "train"] and inner[-1] == "--resume"
    # The submit host hashed the image once; the job checked it is that same file.
    recorded = wd / "results" / "runs" / "ddp-strong-n2-t1-g0-r0" / "container.json"
    assert digest in recorded.read_text()
    assert "submit host" in recorded.read_text()
