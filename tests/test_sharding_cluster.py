"""FSDP2, tensor and pipeline parallelism across the nodes of the Slurm test cluster.

Ranks on different nodes (own network namespace, hostname and /tmp) under
``srun --mpi=pmix``: fsdp at 2 ranks (one per node), fsdp dp=2 x tp=2 at 4 ranks
(2 per node, tensor-parallel peers on one node) and dp=2 x tp=2 x pp=2 at 8 ranks (4 per
node: one pipeline stage per node, activations sent between nodes) end within 1e-5 of
one local process.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import VENV_BIN, run
from test_pipeline_training import GPT4
from test_sharding import ATOL, GPT_TINY

PY = str(VENV_BIN / "python")

pytestmark = pytest.mark.cluster


def _weights(path) -> dict:
    return torch.load(path / "model.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


PP_SETS = ["dist.backend=ddp", "dist.tp=2", "dist.pp=2", "dist.microbatches=2"]


@pytest.mark.parametrize(
    "srun_args, sets, world",
    [
        (["-N2", "-n2"], ["dist.backend=fsdp"], 2),
        (["-N2", "--ntasks-per-node=2"], ["dist.backend=fsdp", "dist.tp=2"], 4),
        (["-N2", "--ntasks-per-node=4"], PP_SETS, 8),
    ],
    ids=["fsdp-2nodes", "fsdp2xtp2-2nodes", "dp2xtp2xpp2-2nodes"],
)
def test_sharded_training_across_nodes_equals_one_process(cluster, srun_args, sets, world):
    tag = f"{os.getpid()}-{world}"
    cfg = json.loads(json.dumps(GPT4 if "dist.pp=2" in sets else GPT_TINY))
    cfg["dist"] = {"timeout_s": 60}
    cfg_file = cluster.shared_dir / f"gpt-{tag}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    extra = [arg for s in sets for arg in ("--set", s)]
    ref = cluster.shared_dir / f"gpt-ref-{tag}"
    run(
        [
            PY,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(cfg_file),
            "--out",
            str(ref),
            "--set",
            "dist.backend=none",
        ],
        timeout=300,
        env=cluster.env({"OMP_NUM_THREADS": "1"}),
    )
    out = cluster.shared_dir / f"gpt-sharded-{tag}"
    cluster.srun(
        [
            "--mpi=pmix",
            *srun_args,
            PY,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(cfg_file),
            "--out",
            str(out),
            *extra,
        ],
        timeout=400,
    )
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    backend = sets[0].removeprefix("dist.backend=")
    assert (summary["status"], summary["world_size"], summary["backend"]) == (
        "completed",
        world,
        backend,
    )
    assert len(set(info["hostnames"])) == 2
    if "dist.pp=2" in sets:  # one stage per node: the first four ranks on the first node
        assert (summary["dp"], summary["tp"], summary["pp"]) == (2, 2, 2)
        assert len(set(info["hostnames"][:4])) == len(set(info["hostnames"][4:])) == 1
    assert _max_diff(_weights(out), _weights(ref)) < ATOL
