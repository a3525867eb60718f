"""commbench for real on 2 ranks under mpirun, for torch.distributed, Horovod and mpi4py."""

from __future__ import annotations

import csv
import json
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import VENV_BIN, mpirun, run, tool_env

from scalelab.comm import bench
from scalelab.comm.results import DPI, FIGSIZE
from scalelab.errors import UsageError
from scalelab.units import parse_size

SCALELAB = str(VENV_BIN / "scalelab")
SMALL = [
    "--min-bytes",
    "1K",
    "--max-bytes",
    "64K",
    "--factor",
    "4",
    "--iters",
    "3",
    "--warmup",
    "1",
]


@pytest.mark.parametrize("lib", ["torch", "horovod", "mpi4py"])
def test_commbench_two_ranks(lib, tmp_path):
    out = tmp_path / "cb"
    proc = mpirun(2, [SCALELAB, "commbench", "--lib", lib, *SMALL, "--out", str(out)], timeout=120)
    assert "busbw(GB/s)" in proc.stdout
    with open(out / "commbench.csv") as fh:
        rows = list(csv.DictReader(fh))
    jsonl = [json.loads(line) for line in (out / "commbench.jsonl").read_text().splitlines()]
    assert len(rows) == len(jsonl) == 3 * 4
    assert {r["op"] for r in jsonl} == {"allreduce", "allgather", "broadcast"}
    assert sorted({r["size_bytes"] for r in jsonl}) == [1024, 4096, 16384, 65536]
    factor = {"allreduce": 2 * (2 - 1) / 2, "allgather": (2 - 1) / 2, "broadcast": 1.0}
    for r in jsonl:
        assert r["lib"] == lib and r["world_size"] == 2 and r["nodes"] == 1
        assert r["wrong"] == 0, r
        assert r["time_s"] > 0 and r["time_max_s"] >= r["time_s"] * 0.999
        assert r["algbw_GBps"] == pytest.approx(r["size_bytes"] / r["time_s"] / 1e9, rel=1e-9)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factor[r["op"]], rel=1e-9)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["lib"] == lib and meta["world_size"] == 2 and meta["launcher"] == "openmpi"
    assert "| allreduce | 1024 |" in (out / "commbench.md").read_text()
    img = mpimg.imread(out / "commbench.png")
    assert img.shape[:2] == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI))
    assert float(np.std(img[..., :3])) > 0.01
    assert "<svg" in (out / "commbench.svg").read_text()


def test_busbw_factors():
    assert bench.bus_factor("allreduce", 8) == pytest.approx(2 * 7 / 8)
    assert bench.bus_factor("allgather", 8) == pytest.approx(7 / 8)
    assert bench.bus_factor("broadcast", 8) == 1.0


class _Local:
    """One process, no peers: time_op needs only sync and barrier (both no-ops here)."""

    def sync(self) -> None: ...

    def barrier(self) -> None: ...


def test_one_descheduled_block_does_not_become_the_figure():
    """time_op reports the median of up to BLOCKS timed blocks: one 1 s stall among
    2 ms calls leaves the figure near 2 ms (a single block's mean would be ~200 ms)."""
    import time

    calls = []

    def run_once() -> None:
        calls.append(1)
        time.sleep(1.0 if len(calls) == 3 else 0.002)  # the 1st timed call, after 2 warm-ups

    t = bench.time_op(_Local(), run_once, iters=5, warmup=2)
    assert len(calls) == 7
    assert 0.0015 < t < 0.1, t


def test_blocks_split_every_timed_call():
    calls = []
    bench.time_op(_Local(), lambda: calls.append(1), iters=12, warmup=0)
    assert len(calls) == 12


def test_default_sizes_span_1k_to_256m():
    sizes = bench.message_sizes(parse_size("1K"), parse_size("256M"), 2)
    assert sizes[0] == 1024 and sizes[-1] == 256 * 2**20 and len(sizes) == 19
    x4 = bench.message_sizes(1024, 256 * 2**20, 4)
    assert x4 == [1024 * 4**i for i in range(10)]
    assert bench.message_sizes(1024, 3000, 2) == [1024, 2048, 3000]
    helptext = run([SCALELAB, "commbench", "--help"]).stdout
    assert "1K" in helptext and "256M" in helptext


@pytest.mark.parametrize("text", ["", "12Q", "-1K", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text, "--max-bytes")


def test_bad_ops_is_usage_error(tmp_path):
    proc = run(
        [
            SCALELAB,
            "commbench",
            "--lib",
            "mpi4py",
            "--ops",
            "allreduce,alltoall",
            "--out",
            str(tmp_path / "cb"),
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "--ops" in proc.stderr and "alltoall" in proc.stderr
    assert not (tmp_path / "cb").exists()


def test_torch_commbench_from_slurm_step_environment(tmp_path):
    """Plain `srun` gives gloo its layout through SLURM_* variables only: emulate two tasks."""
    out = tmp_path / "cb"
    procs = []
    for rank in range(2):
        env = tool_env(
            {
                "SLURM_JOB_ID": "4242",
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0",
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_STEP_TASKS_PER_NODE": "2",
            }
        )
        for key in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))] + [
            "RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ]:
            env.pop(key, None)
        procs.append(
            subprocess.Popen(
                [
                    SCALELAB,
                    "commbench",
                    "--lib",
                    "torch",
                    "--ops",
                    "allreduce",
                    "--min-bytes",
                    "4K",
                    "--max-bytes",
                    "16K",
                    "--factor",
                    "4",
                    "--iters",
                    "2",
                    "--warmup",
                    "1",
                    "--timeout",
                    "60",
                    "--out",
                    str(out),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    meta = json.loads((out / "meta.json").read_text())
    assert meta["launcher"] == "slurm" and meta["world_size"] == 2
    recs = [json.loads(line) for line in (out / "commbench.jsonl").read_text().splitlines()]
    assert [r["size_bytes"] for r in recs] == [4096, 16384]
    assert all(r["wrong"] == 0 for r in recs)
