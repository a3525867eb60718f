"""Rank layout detection: host lists, launcher precedence, and real mpirun/torchrun launches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from train_support import MPIRUN, PY, TORCHRUN, ok, run

from scalelab.errors import UsageError
from scalelab.layout import (
    PORT_BASE,
    PORT_SPAN,
    Layout,
    detect,
    expand_hostlist,
    expand_tasks_per_node,
)


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("n[1-3,5],gpu[01-02]", ["n1", "n2", "n3", "n5", "gpu01", "gpu02"]),
        ("node7", ["node7"]),
        ("a,b,c", ["a", "b", "c"]),
        ("cn[008-011]", ["cn008", "cn009", "cn010", "cn011"]),
        ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
        ("x[9-10].dom", ["x9.dom", "x10.dom"]),
        ("", []),
    ],
)
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[1,,2]"])
def test_expand_hostlist_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(spec)


def test_expand_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


SRUN_PMIX = {  # task 3 of `srun -N2 -n4 --mpi=pmix` on the second node
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "PMIX_RANK": "3",
}


def test_single_process() -> None:
    layout = detect({})
    assert (layout.rank, layout.world_size, layout.launcher) == (0, 1, "single")
    assert layout.is_main


def test_slurm_step() -> None:
    layout = detect(SRUN_PMIX)
    assert layout == Layout(3, 4, 1, 2, "n1", layout.master_port, "slurm")
    assert PORT_BASE <= layout.master_port < PORT_BASE + PORT_SPAN
    # every task of the step derives the same port; another job gets another one
    assert detect({**SRUN_PMIX, "SLURM_PROCID": "0"}).master_port == layout.master_port
    assert detect({**SRUN_PMIX, "SLURM_JOB_ID": "1235"}).master_port != layout.master_port


def test_slurm_overrides_and_uneven_nodes() -> None:
    env = {
        **SRUN_PMIX,
        "MASTER_ADDR": "n1-ib",
        "MASTER_PORT": "31000",
        "SLURM_STEP_TASKS_PER_NODE": "3,1",
        "SLURM_LOCALID": "0",
    }
    layout = detect(env)
    assert (layout.master_addr, layout.master_port, layout.local_world_size) == ("n1-ib", 31000, 1)
    with pytest.raises(UsageError, match="local rank 1 outside local world size 1"):
        detect({**env, "SLURM_LOCALID": "1"})


def test_batch_script_without_srun_is_one_process() -> None:
    # The batch step has SLURM_PROCID and the job's SLURM_NTASKS but no step variables.
    env = {
        "SLURM_JOB_ID": "9",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    assert detect(env).launcher == "single"


def test_torchrun_wins_over_slurm() -> None:
    env = {
        **SRUN_PMIX,
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
    }
    assert detect(env) == Layout(5, 8, 1, 4, "n1", 29500, "torchrun")


def test_openmpi_wins_over_slurm_allocation() -> None:
    env = {
        "SLURM_JOB_ID": "9",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "PMIX_NAMESPACE": "prterun-host-77@1",
    }
    layout = detect(env)
    assert (layout.launcher, layout.rank, layout.master_addr) == ("openmpi", 1, "127.0.0.1")


def test_openmpi_multinode_needs_master_addr_without_mpi() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        detect(env, allow_mpi_query=False)
    assert detect({**env, "MASTER_ADDR": "h0"}, allow_mpi_query=False).master_addr == "h0"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
        ({**SRUN_PMIX, "SLURM_STEP_NODELIST": "n[1-", "SLURM_JOB_NODELIST": ""}, "host list"),
    ],
)
def test_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        detect(env)


def _layouts(stdout: str) -> list[dict]:
    found = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(found, key=lambda d: d["rank"])


def test_real_mpirun_layout() -> None:
    found = _layouts(ok(run([*MPIRUN, PY, "-m", "scalelab.layout"], timeout=60)).stdout)
    assert [(d["rank"], d["world_size"], d["local_rank"], d["launcher"]) for d in found] == [
        (0, 2, 0, "openmpi"),
        (1, 2, 1, "openmpi"),
    ]
    assert found[0]["master_port"] == found[1]["master_port"]
    assert found[0]["master_addr"] == "127.0.0.1"


def test_real_torchrun_layout() -> None:
    found = _layouts(ok(run([*TORCHRUN, "-m", "scalelab.layout"], timeout=60)).stdout)
    assert [(d["rank"], d["world_size"], d["launcher"]) for d in found] == [
        (0, 2, "torchrun"),
        (1, 2, "torchrun"),
    ]


def test_real_mpirun_multinode_path_broadcasts_rank0_host() -> None:
    # Pretend each rank is alone on its node: the rendezvous host must then come from
    # rank 0 over MPI (mpi4py), not from 127.0.0.1.
    code = (
        "import os, json, socket, dataclasses\n"
        "os.environ['OMPI_COMM_WORLD_LOCAL_SIZE'] = '1'\n"
        "os.environ['OMPI_COMM_WORLD_LOCAL_RANK'] = '0'\n"
        "from scalelab.layout import detect\n"
        "line = json.dumps({**dataclasses.asdict(detect()), 'host': socket.gethostname()})\n"
        "os.write(1, (line + '\\n').encode())\n"
    )
    found = _layouts(ok(run([*MPIRUN, PY, "-c", code], timeout=60)).stdout)
    assert [d["local_world_size"] for d in found] == [1, 1]
    assert found[0]["master_addr"] == found[1]["master_addr"] == found[0]["host"]


# One rule for the rank: scalelab.rank decides the launcher; layout.detect and the error
# report (errors.process_rank) both follow it, so they agree on every environment.
_OMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
_TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
_BATCH = {
    "SLURM_JOB_ID": "9",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "2",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NODELIST": "n[1-2]",
}

RANK_ENVS = [
    ("none", {}, "single", "0"),
    ("slurm step (srun --mpi=pmix: PMIx too)", SRUN_PMIX, "slurm", "3"),
    (
        "open mpi (prterun: PMIx too)",
        {**_OMPI, "PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-h-1@1"},
        "openmpi",
        "1",
    ),
    ("torchrun", _TORCHRUN, "torchrun", "5"),
    ("horovodrun", {"HOROVOD_RANK": "2", "HOROVOD_SIZE": "4"}, "horovodrun", "2"),
    ("mpich (hydra)", {"PMI_RANK": "1", "PMI_SIZE": "3"}, "mpich", "1"),
    # Conflicting environments: the inner launcher describes the process.
    ("torchrun under srun", {**SRUN_PMIX, **_TORCHRUN}, "torchrun", "5"),
    ("mpirun in an allocation", {**_BATCH, **_OMPI}, "openmpi", "1"),
    ("srun --mpi=pmi2 (PMI_* too)", {**SRUN_PMIX, "PMI_RANK": "3", "PMI_SIZE": "4"}, "slurm", "3"),
    ("RANK without WORLD_SIZE under mpirun", {**_OMPI, "RANK": "7"}, "openmpi", "1"),
    # A batch or Snakemake job step without step variables is one process, PROCID or not.
    ("batch step", _BATCH, "single", "0"),
    ("PMIx alone", {"PMIX_RANK": "3"}, "single", "0"),
]


@pytest.mark.parametrize("what, env, launcher, rank", RANK_ENVS, ids=[e[0] for e in RANK_ENVS])
def test_one_rank_rule(monkeypatch, what, env, launcher, rank) -> None:
    from scalelab import errors
    from scalelab import rank as rank_rule

    names = rank_rule.launcher_names(env)
    assert (names.launcher if names else "single") == launcher
    assert rank_rule.process_rank(env) == rank
    layout = detect({**env, "MASTER_ADDR": "h0"}, allow_mpi_query=False)
    assert (layout.launcher, str(layout.rank)) == (launcher, rank)
    for name in [k for k in os.environ if k in _ALL_RANK_VARS]:
        monkeypatch.delenv(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert errors.process_rank() == rank


_ALL_RANK_VARS = {k for _, env, _, _ in RANK_ENVS for k in env}


def test_derived_ports_stay_below_this_machines_ephemeral_range() -> None:
    """A derived store port inside the kernel's ephemeral range can be handed to a dialling
    rank as its own source port (TCP self-connect), which hangs the rendezvous."""
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert low >= PORT_BASE + PORT_SPAN
    ports = {detect({**SRUN_PMIX, "SLURM_JOB_ID": str(j)}).master_port for j in range(2000)}
    assert max(ports) < low and min(ports) >= PORT_BASE
