"""Real MPI and Horovod on this machine: 2 ranks under mpirun and horovodrun."""

import json

from conftest import SCRIPTS, VENV_BIN, mpirun, run


def _records(stdout: str) -> list[dict]:
    return sorted(
        (json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )


def test_mpi4py_allreduce_2_ranks():
    recs = _records(mpirun(2, [str(VENV_BIN / "python"), str(SCRIPTS / "mpi_allreduce.py")]).stdout)
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["size"] == 2 and r["sum"] == 3 for r in recs)


def test_horovod_allreduce_2_ranks_mpirun():
    recs = _records(mpirun(2, [str(VENV_BIN / "python"), str(SCRIPTS / "hvd_allreduce.py")]).stdout)
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["size"] == 2 and r["sum"] == 3.0 and r["mpi"] for r in recs)


def test_horovod_allreduce_2_ranks_gloo_controller():
    proc = run(
        [
            str(VENV_BIN / "horovodrun"),
            "-np",
            "2",
            "--gloo",
            str(VENV_BIN / "python"),
            str(SCRIPTS / "hvd_allreduce.py"),
        ],
        timeout=180,
    )
    recs = _records("\n".join(line.split("]<stdout>:", 1)[-1] for line in proc.stdout.splitlines()))
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["sum"] == 3.0 and r["gloo"] and not r["mpi"] for r in recs)
