"""provenance.json in every run directory, and no secret anywhere in a study's outputs.

Real runs only: `scalelab train` under mpirun, and the Snakemake workflow on the
.test config. Secrets are planted in the environment of the whole workflow; every
file under results/ and logs/ is then searched, inside zip members (.pt) and parquet
cells too.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from reliability import record
from train_support import MPIRUN, PY, TINY, TRAIN, deep_update, ok, run, write_config

from scalelab import provenance, redact
from scalelab.fsio import sha256_file

SCHEMA = json.loads(provenance.SCHEMA.read_text())
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-planted-aws-9f3c1",
    "HF_TOKEN": "hf_plantedTokenValue4711",
    "MY_PASSWORD": "planted-password-Zq81x",
    # Allow-listed prefixes with a credential-like name: dropped all the same.
    "NCCL_PLANTED_AUTH_TOKEN": "planted-nccl-token-55aa",
    "OMPI_PLANTED_SECRET": "planted-ompi-secret-66bb",
}


def validate(manifest: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)


def leaks(root: Path, values: list[str]) -> list[str]:
    """'file: value' for every planted value found in any file under root (raw bytes,
    every zip member, every parquet cell and column name)."""
    found = []
    needles = [v.encode() for v in values]

    def scan(name: str, data: bytes) -> None:
        found.extend(f"{name}: {n.decode()}" for n in needles if n in data)

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        scan(str(path), data)
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for member in zf.namelist():
                    scan(f"{path}!{member}", zf.read(member))
        if path.suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            scan(f"{path} (cells)", frame.to_csv().encode())
    return found


def test_manifest_of_a_two_rank_run_validates_names_layout_and_keeps_no_secret(tmp_path):
    cfg = write_config(tmp_path / "run.yaml", deep_update(TINY, {"train": {"deterministic": True}}))
    out = tmp_path / "run"
    ok(
        run(
            [*MPIRUN, PY, *TRAIN, "--config", str(cfg), "--out", str(out)],
            timeout=180,
            extra_env={**SECRETS, "NCCL_DEBUG": "WARN"},
        )
    )
    manifest = json.loads((out / "provenance.json").read_text())
    validate(manifest)
    must, inc = manifest["must_match"], manifest["incidental"]
    assert must["world_size"] == 2 and must["tasks_per_node"] == 2 and must["nodes"] == 1
    assert must["launcher"] == "openmpi"
    assert must["versions"]["torch"] == __import__("torch").__version__
    assert must["versions"]["mpi"].startswith("Open MPI")
    assert must["deterministic"] is True and must["seed"] == TINY["seed"]
    assert must["config_sha256"] == provenance.config_sha256(
        yaml.safe_load((out / "config.yaml").read_text())
    )
    assert manifest["provenance_id"] == provenance.provenance_id(must)
    # The launcher's command line is found from the rank's ancestry.
    assert inc["launcher_argv"] and Path(inc["launcher_argv"][0]).name in ("mpirun", "prterun")
    # The allow-list keeps what describes the run and nothing that looks like a credential.
    assert inc["env"]["NCCL_DEBUG"] == "WARN" and inc["env"]["OMP_NUM_THREADS"] == "1"
    assert any(k.startswith("OMPI_") for k in inc["env"])
    assert not leaks(out, list(SECRETS.values()))


def test_allow_list_and_redaction_are_by_name():
    env = {
        "HF_TOKEN": "x",
        "NCCL_IB_HCA": "mlx5",
        "NCCL_X_PASSWORD": "y",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_ACCOUNT": "proj",
        "HOME": "/root",
        "OMP_NUM_THREADS": "4",
    }
    assert redact.allowed_env(env) == {
        "NCCL_IB_HCA": "mlx5",
        "OMP_NUM_THREADS": "4",
        "SLURM_JOB_ID": "7",
    }
    assert redact.redact_argv(["mpirun", "-x", "HF_TOKEN=abc", "-x", "NCCL_DEBUG=INFO"]) == [
        "mpirun",
        "-x",
        "HF_TOKEN=<redacted>",
        "-x",
        "NCCL_DEBUG=INFO",
    ]
    # The schema itself refuses a manifest that carries a credential-like name.
    from scalelab.layout import Layout
    from scalelab.train.config import from_dict

    single = Layout(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    manifest = provenance.collect(from_dict(TINY), Path("unused-run-dir"), single)
    validate(manifest)
    manifest["incidental"]["env"]["HF_TOKEN"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate(manifest)


def test_workflow_run_manifests_validate_and_no_planted_secret_in_results_or_logs(tmp_path):
    """The shipped workflow on the .test config (staging, both backends on 2 ranks,
    evaluation, commbench, analysis), with secrets in the environment of every job."""
    from conftest import tool_env
    from test_workflow import copy_workflow, snakemake

    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    cfg["sweep"]["tasks_per_node"] = [2]
    (wd / "secret.yaml").write_text(yaml.safe_dump(cfg))
    env = tool_env(SECRETS)
    names = ["ddp-strong-n1-t2-g0-r0", "horovod-strong-n1-t2-g0-r0"]
    # Staging, training under mpirun, evaluation, the communication benchmark and the analysis.
    targets = [
        *(f"results/runs/{n}/evaluation.json" for n in names),
        "results/commbench/torch",
        "results/analysis/scaling.csv",
    ]
    snakemake(wd, [*targets, "--cores", "2", "--configfile", "secret.yaml"], env=env)
    runs = sorted((wd / "results" / "runs").iterdir())
    assert [r.name for r in runs] == names
    for run_dir in runs:
        manifest = json.loads((run_dir / "provenance.json").read_text())
        validate(manifest)
        assert manifest["must_match"]["world_size"] == 2
        assert manifest["must_match"]["data_sha256"] == sha256_file(
            wd / manifest["config"]["data"]["path"] / "manifest.json"
        )
        assert manifest["incidental"]["data"]["path"] == str(wd / "results" / "data")
        assert manifest["incidental"]["data"]["source"] == "staged"
    files = [p for d in ("results", "logs") for p in (wd / d).rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".parquet", ".json", ".log"} <= kinds, kinds  # the binary outputs are there
    found = leaks(wd / "results", list(SECRETS.values())) + leaks(
        wd / "logs", list(SECRETS.values())
    )
    assert not found, found
    record(
        "planted-secrets",
        planted=len(SECRETS),
        files_searched=len(files),
        leaked=len(found),
        binary_outputs_searched=sorted(kinds & {".pt", ".parquet"}),
    )
    # A workflow run (scalelab launch, staged data) reruns bitwise from its manifest.
    proc = subprocess.run(
        [
            PY,
            "-m",
            "scalelab",
            "reproduce",
            f"results/runs/{names[0]}",
            "--out",
            str(tmp_path / "rerun"),
        ],
        cwd=wd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "reproduced" in proc.stdout, proc.stdout + proc.stderr
    assert "mpirun -n 2" in proc.stdout
    assert not leaks(tmp_path / "rerun", list(SECRETS.values()))
    # The search would have found a value written plainly, or inside a .pt.
    import torch

    torch.save({"note": SECRETS["HF_TOKEN"]}, wd / "results" / "planted.pt")
    assert f"{wd / 'results' / 'planted.pt'}!planted/data.pkl: {SECRETS['HF_TOKEN']}" in leaks(
        wd / "results", [SECRETS["HF_TOKEN"]]
    )


@pytest.mark.cluster
def test_manifest_on_the_test_cluster_and_reproduce_inside_an_allocation(cluster):
    """2 nodes under srun: the manifest names Slurm's job, nodes and layout; `reproduce`
    run inside an allocation of the same shape reruns with srun, bitwise."""
    import os

    tag = f"prov-{os.getpid()}"
    cfg = write_config(
        cluster.shared_dir / f"{tag}.yaml",
        deep_update(
            TINY, {"train": {"deterministic": True}, "dist": {"backend": "ddp", "timeout_s": 60}}
        ),
    )
    out = cluster.shared_dir / f"{tag}-run"
    cluster.srun(
        ["-N2", "-n2", PY, *TRAIN, "--config", str(cfg), "--out", str(out)],
        timeout=300,
        extra_env=SECRETS,
    )
    manifest = json.loads((out / "provenance.json").read_text())
    validate(manifest)
    must, inc = manifest["must_match"], manifest["incidental"]
    assert (must["launcher"], must["world_size"], must["nodes"], must["tasks_per_node"]) == (
        "slurm",
        2,
        2,
        1,
    )
    assert inc["slurm"]["job_id"] and re.fullmatch(
        r"n\[\d-\d\]|n\d,n\d|n\[\d,\d\]", inc["slurm"]["nodelist"]
    )
    assert inc["env"]["SLURM_JOB_ID"] == inc["slurm"]["job_id"]
    assert not leaks(out, list(SECRETS.values()))
    # A Slurm run is rerun with srun, so only inside an allocation.
    outside = run([PY, "-m", "scalelab", "reproduce", str(out), "--out", str(out) + "-x"])
    assert outside.returncode == 2 and "salloc -N 2" in outside.stderr
    proc = run(
        [
            "salloc",
            "-N2",
            "-n2",
            PY,
            "-m",
            "scalelab",
            "reproduce",
            str(out),
            "--out",
            f"{out}-rerun",
        ],
        timeout=300,
        extra_env=cluster.env(),
    )
    assert proc.returncode == 0 and "reproduced" in proc.stdout, proc.stdout + proc.stderr
    assert "srun --mpi=pmix --nodes=2 --ntasks=2" in proc.stdout


def test_a_resumed_run_keeps_its_manifest_and_records_each_start(tmp_path):
    """A requeued job (summary not yet written) resumes: same manifest, one more start."""
    cfg = write_config(tmp_path / "run.yaml", deep_update(TINY, {"train": {"epochs": 2}}))
    out = tmp_path / "run"
    ok(run([PY, *TRAIN, "--config", str(cfg), "--out", str(out)], timeout=120))
    first = json.loads((out / "provenance.json").read_text())
    (out / "summary.json").unlink()  # as if stopped after the last checkpoint
    ok(run([PY, *TRAIN, "--config", str(cfg), "--out", str(out), "--resume"], timeout=120))
    again = json.loads((out / "provenance.json").read_text())
    validate(again)
    assert again["provenance_id"] == first["provenance_id"]
    assert again["incidental"]["started_at"] == first["incidental"]["started_at"]
    assert len(again["incidental"]["starts"]) == 2
    assert "changed_on_resume" not in again["incidental"]
    # A completed run is left alone by a later `train` into it.
    before = (out / "provenance.json").read_bytes()
    ok(run([PY, *TRAIN, "--config", str(cfg), "--out", str(out), "--resume"], timeout=120))
    assert (out / "provenance.json").read_bytes() == before


def test_horovods_version_decides_only_the_runs_that_use_it():
    """An environment without Horovod reproduces a DDP run (auto under mpirun, or explicit)
    but not a Horovod run (explicit, or auto under horovodrun); torch decides all of them."""
    from scalelab.provenance import must_match_differences

    def must(backend: str, launcher: str, horovod: str | None, torch: str = "2.13.0") -> dict:
        build = {"mpi": True, "gloo": True} if horovod else None
        versions = {"torch": torch, "horovod": horovod, "horovod_build": build}
        return {"backend": backend, "launcher": launcher, "world_size": 2, "versions": versions}

    for backend, launcher in (("ddp", "torchrun"), ("auto", "openmpi"), ("fsdp", "slurm")):
        assert (
            must_match_differences(must(backend, launcher, "0.28.1"), must(backend, launcher, None))
            == []
        ), backend
        changed = must_match_differences(
            must(backend, launcher, "0.28.1"), must(backend, launcher, None, torch="2.12.0")
        )
        assert changed == ["versions.torch: '2.13.0' (recorded) != '2.12.0' (now)"], changed
    for backend, launcher in (("horovod", "openmpi"), ("auto", "horovodrun")):
        changed = must_match_differences(
            must(backend, launcher, "0.28.1"), must(backend, launcher, None)
        )
        assert "versions.horovod: '0.28.1' (recorded) != None (now)" in changed, changed
        assert any(k.startswith("versions.horovod_build.mpi:") for k in changed), changed
