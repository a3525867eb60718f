"""The image's %test training step, run here on the host venv (CPU, Horovod over MPI)."""

import argparse
import json

from conftest import VENV_BIN, run

from scalelab.container.selftest import problems

GOOD = {
    "loss": 1.3,
    "weights_moved": True,
    "allreduce_sum": 1.0,
    "size": 1,
    "torch": "2.13.0+cpu",
    "torch_cuda": None,
    "horovod": "0.28.1",
    "mpi_built": True,
    "nccl_built": False,
    "mpi_library": "Open MPI v5.0.11, package: Open MPI",
}


def expect(**kw):
    base = dict(
        expect_torch=None, expect_horovod=None, expect_cuda=None, expect_nccl=False, expect_mpi=None
    )
    return argparse.Namespace(**{**base, **kw})


def test_one_training_step_on_one_rank():
    proc = run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "scalelab.container.selftest",
            "--expect-mpi",
            "Open MPI",
            "--expect-horovod",
            "0.28.1",
        ],
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["problems"] == []
    assert result["size"] == 1 and result["weights_moved"] and result["mpi_built"]


def test_selftest_fails_on_an_unmet_expectation():
    proc = run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "scalelab.container.selftest",
            "--expect-nccl",
            "--expect-mpi",
            "MPICH",
        ],
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("without NCCL" in p for p in result["problems"])
    assert any("expected 'MPICH'" in p for p in result["problems"])


def test_problems():
    assert (
        problems(
            GOOD, expect(expect_torch="2.13.0", expect_horovod="0.28.1", expect_mpi="Open MPI")
        )
        == []
    )
    assert problems({**GOOD, "loss": float("nan")}, expect()) == ["loss is nan"]
    assert problems({**GOOD, "weights_moved": False}, expect()) == [
        "the optimizer step did not change the weights"
    ]
    assert problems({**GOOD, "allreduce_sum": 2.0}, expect()) == [
        "allreduce of ones gave 2.0, expected 1"
    ]
    assert problems({**GOOD, "mpi_built": False}, expect()) == ["Horovod was built without MPI"]
    assert problems(GOOD, expect(expect_cuda="12.8")) == [
        "torch was built for CUDA None, expected 12.8"
    ]
    assert problems(GOOD, expect(expect_torch="2.12.0")) == ["torch is 2.13.0+cpu, expected 2.12.0"]
