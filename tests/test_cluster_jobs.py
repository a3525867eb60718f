"""Staging, training and commbench across the 2 nodes of the Slurm test cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, run, two_nodes

PY = str(VENV_BIN / "python")


@pytest.fixture(scope="module")
def staged(cluster) -> Path:
    data = cluster.shared_dir / "digits"
    if not (data / "index.json").exists():
        run(
            [
                PY,
                "-m",
                "scalelab",
                "data",
                "stage",
                "--source",
                "digits",
                "--out",
                str(data),
                "--shards",
                "3",
                "--quiet",
            ]
        )
    return data


def test_node_local_staging_copies_once_per_node_and_verifies(cluster, staged):
    # Two ranks per node ask at once: one copy per node, the same path everywhere.
    proc = cluster.srun(
        [
            "-N2",
            "--ntasks-per-node=2",
            PY,
            "-m",
            "scalelab",
            "data",
            "localize",
            str(staged),
            "--scratch",
            "/tmp",
            "--reserve",
            "1MiB",
            "--quiet",
        ]
    )
    paths = set(proc.stdout.split())
    assert len(paths) == 1, proc.stdout
    local = paths.pop()
    assert local.startswith("/tmp/scalelab-data/")
    assert not Path(local).exists()  # the host's /tmp is not a node's /tmp
    # One copy (a directory) per node, beside its lock file; no leftover temporaries.
    listing = cluster.srun(
        [
            "-N2",
            "--ntasks-per-node=1",
            "bash",
            "-c",
            'echo "$(hostname) $(find /tmp/scalelab-data -mindepth 1 -maxdepth 1 -type d | wc -l)"',
        ]
    ).stdout
    lines = listing.split("\n")[:-1]
    assert two_nodes(x.split()[0] for x in lines) and all(x.endswith(" 1") for x in lines)
    verify = cluster.srun(
        ["-N2", "--ntasks-per-node=1", PY, "-m", "scalelab", "data", "verify", local, "--quiet"]
    )
    assert verify.stdout.count("OK") == 2, verify.stdout + verify.stderr


def test_training_reads_node_local_copy_across_nodes(cluster, staged):
    out = cluster.shared_dir / f"run-localize-{os.getpid()}"
    cfg = {
        "seed": 0,
        "model": {"name": "cnn"},
        "data": {"source": "staged", "path": str(staged), "localize": True, "scratch": "/tmp"},
        "optim": {"global_batch_size": 64, "lr": 0.05},
        "train": {"epochs": 1, "threads": 1, "deterministic": True},
        "dist": {"backend": "ddp", "timeout_s": 60},
    }
    cfg_file = cluster.shared_dir / f"localize-{os.getpid()}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    cluster.srun(
        ["-N2", "-n2", PY, "-m", "scalelab", "train", "--config", str(cfg_file), "--out", str(out)],
        timeout=300,
    )
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert two_nodes(info["hostnames"])
    assert summary["val_acc"] > 0.5


@pytest.mark.parametrize("lib, mpi", [("torch", None), ("mpi4py", "pmix"), ("horovod", "pmix")])
def test_commbench_across_nodes(cluster, lib, mpi):
    out = cluster.shared_dir / f"commbench-{lib}-{os.getpid()}"
    args = ["-N2", "-n2"] + ([f"--mpi={mpi}"] if mpi else [])
    cluster.srun(
        [
            *args,
            PY,
            "-m",
            "scalelab",
            "commbench",
            "--lib",
            lib,
            "--max-bytes",
            "1M",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        timeout=300,
    )
    records = [json.loads(line) for line in (out / "commbench.jsonl").read_text().splitlines()]
    assert {r["op"] for r in records} == {"allreduce", "allgather", "broadcast"}
    assert max(r["size_bytes"] for r in records) == 1 << 20
    for r in records:
        assert r["wrong"] == 0 and r["world_size"] == 2
        factor = {"allreduce": 2 * (2 - 1) / 2, "allgather": (2 - 1) / 2, "broadcast": 1.0}
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factor[r["op"]], rel=1e-9)
