"""The command lines that start ranks: srun, mpirun, torchrun and horovodrun.

The one place they are spelled out, always as argument lists (never a shell string),
for ``scalelab launch`` (training jobs and any sub-command, e.g. commbench),
``scalelab reproduce`` and ``scalelab container exec --srun``. A container call goes
inside the launcher (:func:`compose`): ``srun ... apptainer exec IMAGE scalelab ...``,
the hybrid model. tests/test_launch_commands.py holds every other module to asking here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

from scalelab.errors import UsageError
from scalelab.tools import which

SRUN = "srun"
MPIRUN = "mpirun"
HOROVODRUN = "horovodrun"
#: torchrun as a module of the running interpreter (its console script may be absent).
TORCHRUN_MODULE = "torch.distributed.run"


def scalelab_command(
    args: Sequence[str], container_prefix: Sequence[str] | None = None
) -> list[str]:
    """A per-rank `scalelab ARGS` command: the venv's interpreter, or `scalelab` in the image."""
    head = (
        [*container_prefix, "scalelab"] if container_prefix else [sys.executable, "-m", "scalelab"]
    )
    return [*head, *args]


def srun(
    *,
    mpi: str,
    nodes: int,
    ntasks: int,
    tasks_per_node: int,
    cpus_per_task: int | None = None,
    kill_on_bad_exit: bool = True,
    gres: str | None = None,
    flags: Iterable[str] = (),
    locate: bool = True,
    per_node_first: bool = False,
) -> list[str]:
    """``srun --mpi=MPI --nodes=N --ntasks=R --ntasks-per-node=T [--cpus-per-task=C]
    [--kill-on-bad-exit=1] [--gres=G] FLAGS...``: every flag explicit, because a Snakemake
    job step does not pass the allocation's SLURM_* variables on to the rule's shell.

    ``mpi``: the plugin (pmix, pmi2, ...); ``flags``: the site's extra srun flags, as a
    list. ``locate``: srun's path where it is found (else the bare name, for a printed
    command). ``per_node_first``: ``--ntasks-per-node`` before ``--ntasks``, the order
    ``container exec --srun`` has always printed (srun reads both orders the same).
    """
    counts = [f"--ntasks={ntasks}", f"--ntasks-per-node={tasks_per_node}"]
    argv = [
        (which(SRUN) or SRUN) if locate else SRUN,
        f"--mpi={mpi}",
        f"--nodes={nodes}",
        *(counts[::-1] if per_node_first else counts),
    ]
    if cpus_per_task:
        argv.append(f"--cpus-per-task={cpus_per_task}")
    if kill_on_bad_exit:
        argv.append("--kill-on-bad-exit=1")
    if gres:
        argv.append(f"--gres={gres}")
    return [*argv, *flags]


def mpirun(ranks: int, cores: int, not_found: str) -> list[str]:
    """``mpirun -n RANKS`` as scalelab starts local ranks: no core binding (each rank's
    data loading and threads share the node), root allowed, and oversubscribed when the
    ranks ask for more than this machine's cores (``cores``: what they ask in all).

    ``not_found``: the one-line UsageError when there is no mpirun.
    """
    path = which(MPIRUN)
    if not path:
        raise UsageError(not_found)
    argv = [path, "-n", str(ranks), "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if cores > (os.cpu_count() or 1):
        argv.append("--oversubscribe")
    return argv


def torchrun(nproc_per_node: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N`` (one machine)."""
    return [
        sys.executable,
        "-m",
        TORCHRUN_MODULE,
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
    ]


#: ``srun --mpi=none``: elastic agents are not MPI ranks (no PMIx wire-up to wait for).
SRUN_NO_MPI = "none"
#: torchrun's rendezvous backend for elastic jobs: a TCP store on the endpoint's host
#: (no etcd), hosted by the agent that binds it first.
RDZV_BACKEND = "c10d"


def torchrun_elastic(
    *,
    nproc_per_node: int,
    min_nodes: int,
    max_nodes: int,
    max_restarts: int,
    endpoint: str,
    run_id: str,
    rdzv_conf: dict[str, str] | None = None,
) -> list[str]:
    """``python -m torch.distributed.run --nnodes=MIN:MAX --nproc-per-node=N
    --max-restarts=R --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID``: one
    elastic agent per node; the agents rendezvous at ``endpoint`` and restart every
    worker with the new world size when a node is lost or joins (``dist.elastic``).
    ``rdzv_conf``: the rendezvous options (e.g. ``last_call_timeout``, ``is_host``)."""
    argv = [
        sys.executable,
        "-m",
        TORCHRUN_MODULE,
        f"--nnodes={min_nodes}:{max_nodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--rdzv-backend={RDZV_BACKEND}",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
    ]
    if rdzv_conf:
        argv.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in rdzv_conf.items()))
    return argv


def horovodrun(ranks: int) -> list[str]:
    """``horovodrun -np RANKS``."""
    return [which(HOROVODRUN) or HOROVODRUN, "-np", str(ranks)]


def is_torchrun(launcher: Sequence[str]) -> bool:
    """Whether ``launcher`` runs torchrun: alone, or after srun (elastic agents per node)."""
    argv = list(launcher)
    return any(argv[i : i + 2] == ["-m", TORCHRUN_MODULE] for i in range(len(argv) - 1))


def compose(launcher: Sequence[str], per_rank: Sequence[str]) -> list[str]:
    """The launcher, then the command every rank runs (``[]``: one process, run directly).

    torchrun runs a module or a script, not an arbitrary program: a per-rank
    ``python -m scalelab ...`` becomes ``-m scalelab ...`` after it. A container call
    (``apptainer exec ... IMAGE scalelab ...``) goes inside the launcher as it is.
    """
    if is_torchrun(launcher) and list(per_rank[:2]) == [sys.executable, "-m"]:
        return [*launcher, *per_rank[1:]]
    return [*launcher, *per_rank]
