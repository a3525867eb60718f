"""The multi-node Slurm test cluster: real slurmctld/slurmd, real srun --mpi=pmix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, VENV_BIN, require_cluster, two_nodes

from scalelab.testcluster.cluster import TestCluster
from scalelab.testcluster.spec import ClusterError, ClusterSpec

PY = str(VENV_BIN / "python")


def _records(stdout: str) -> list[dict]:
    return sorted(
        (json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )


def test_nodes_have_own_hostname_and_private_tmp(cluster):
    marker = f"scalelab-marker-{os.getpid()}"
    out = cluster.srun(
        [
            "-N2",
            "-n2",
            "bash",
            "-c",
            f'touch /tmp/{marker}; echo "$(hostname) $(getent hosts n1 n2 | wc -l) '
            f'$(ls /tmp | grep -c {marker})"',
        ]
    ).stdout.split("\n")
    rows = sorted(line.split() for line in out if line.strip())
    assert rows == [["n1", "2", "1"], ["n2", "2", "1"]]
    # The host's /tmp is not the nodes' /tmp.
    assert not Path("/tmp", marker).exists()


def test_project_visible_on_every_node(cluster):
    out = cluster.srun(["-N2", "-n2", "cat", str(REPO / "pyproject.toml")]).stdout
    assert out.count('name = "scalelab"') == 2


def test_mpi4py_allreduce_across_nodes_srun_pmix(cluster):
    proc = cluster.srun(["-N2", "-n2", "--mpi=pmix", PY, str(SCRIPTS / "mpi_allreduce.py")])
    recs = _records(proc.stdout)
    assert [r["rank"] for r in recs] == [0, 1] and two_nodes(r["host"] for r in recs)
    assert all(r["size"] == 2 and r["sum"] == 3 for r in recs)
    assert "couldn't open help file" not in proc.stderr


def test_horovod_allreduce_across_nodes_srun_pmix(cluster):
    proc = cluster.srun(["-N2", "-n2", "--mpi=pmix", PY, str(SCRIPTS / "hvd_allreduce.py")])
    recs = _records(proc.stdout)
    assert [r["rank"] for r in recs] == [0, 1] and two_nodes(r["host"] for r in recs)
    assert all(r["size"] == 2 and r["sum"] == 3.0 and r["mpi"] for r in recs)


def test_torch_gloo_allreduce_across_nodes_rendezvous_from_nodelist(cluster):
    proc = cluster.srun(
        ["-N2", "-n2", PY, str(SCRIPTS / "gloo_allreduce.py")],
        extra_env={"MASTER_ADDR": "", "MASTER_PORT": ""},
    )
    recs = _records(proc.stdout)
    assert [r["rank"] for r in recs] == [0, 1] and two_nodes(r["host"] for r in recs)
    assert all(r["sum"] == 3.0 and r["master_addr"] == "n1" for r in recs)


def test_sbatch_job_runs_on_both_nodes(cluster):
    out_file = cluster.shared_dir / f"sbatch-{os.getpid()}.out"
    script = cluster.shared_dir / f"job-{os.getpid()}.sh"
    script.write_text("#!/bin/bash\nsrun hostname\n")
    env = cluster.env()
    subprocess.run(
        ["sbatch", "--wait", "-N2", "-n2", "-o", str(out_file), str(script)],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert two_nodes(out_file.read_text().split())


# A second, separate cluster so lifecycle tests never disturb the session's one.
def _lifecycle_spec(state_dir: Path, **kw) -> ClusterSpec:
    return ClusterSpec(
        nodes=1,
        cpus_per_node=1,
        state_dir=state_dir,
        prefix="slt",
        subnet="10.202.0",
        ctld_port=6827,
        slurmd_port=6828,
        shared=[REPO, Path(sys.prefix)],
        **kw,
    )


def _leftovers(spec: ClusterSpec, pids: list[int]) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [
        f"netns {line.split()[0]}"
        for line in netns.splitlines()
        if line.startswith(f"{spec.prefix}-")
    ]
    found += [
        f"link {name}"
        for name in os.listdir("/sys/class/net")
        if name.startswith(spec.prefix + "br") or name.startswith(spec.prefix + "v")
    ]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] != "Z":
                    found.append(f"pid {pid}")
        except OSError:
            pass
    if Path(spec.state_dir).exists():
        found.append(f"dir {spec.state_dir}")
    return found


def test_up_twice_then_down_leaves_nothing():
    require_cluster()
    spec = _lifecycle_spec(Path("/var/lib/scalelab/testcluster-lifecycle"))
    tc = TestCluster(spec)
    try:
        tc.up()
        first = dict(tc.status()["daemons"])
        tc.up()  # idempotent: the healthy cluster is kept, same daemons
        second = tc.status()["daemons"]
        assert {k: v["pid"] for k, v in first.items()} == {k: v["pid"] for k, v in second.items()}
        assert all(v["alive"] for v in second.values())
        host = subprocess.run(
            ["srun", "-N1", "hostname"],
            env=tc.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        assert host == "n1"
    finally:
        pids = [v["pid"] for v in tc.status()["daemons"].values()]
        tc.down()
    assert pids and _leftovers(spec, pids) == []


def test_failing_daemon_reports_its_log_and_cleans_up():
    require_cluster()
    spec = _lifecycle_spec(Path("/var/lib/scalelab/testcluster-broken"))
    # Hold the controller's port so slurmctld cannot bind it.
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", spec.ctld_port))
    blocker.listen()
    try:
        with pytest.raises(ClusterError) as err:
            TestCluster(spec).up(timeout=20)
    finally:
        blocker.close()
    message = str(err.value)
    assert "slurmctld" in message and "last lines of" in message
    assert _leftovers(spec, [])[:1] in ([], [f"dir {spec.state_dir}"])  # only logs kept
    assert not (Path(spec.state_dir) / "cluster.json").exists()
    TestCluster(spec).down(quiet=True)
    assert _leftovers(spec, []) == []
