"""Which launcher describes this process, and its rank: the one rule, from the environment.

First match wins, because launchers nest (the reasons are in :mod:`scalelab.layout`):
torchrun (``RANK`` with ``WORLD_SIZE``), horovodrun (``HOROVOD_RANK`` with
``HOROVOD_SIZE``), Open MPI (``OMPI_COMM_WORLD_RANK``), MPICH / Intel MPI (``PMI_RANK``
with ``PMI_SIZE``, outside an srun step), the tasks of an srun step (``SLURM_PROCID``
with ``SLURM_STEP_NUM_TASKS``), else one process. :func:`scalelab.layout.detect` reads
the whole layout by this rule and :func:`scalelab.errors.report_error` names the rank
by it. Nothing here imports the rest of scalelab, so the lowest modules can ask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """Where one launcher puts the rank layout in the environment."""

    launcher: str
    rank: str
    size: str
    local_rank: str
    local_size: str


TORCHRUN = Names("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
HOROVODRUN = Names(
    "horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"
)
OPENMPI = Names(
    "openmpi",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)
MPICH = Names("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
#: Slurm's local size comes from SLURM_STEP_TASKS_PER_NODE (a list), not one variable.
SLURM = Names("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "")


def launcher_names(env: Mapping[str, str] | None = None) -> Names | None:
    """The launcher whose variables describe this process; None: a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return TORCHRUN
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return HOROVODRUN
    if "OMPI_COMM_WORLD_RANK" in env:
        return OPENMPI
    if "PMI_RANK" in env and "PMI_SIZE" in env and "SLURM_STEP_NUM_TASKS" not in env:
        return MPICH
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return SLURM
    return None


def process_rank(env: Mapping[str, str] | None = None) -> str:
    """This process's rank as its launcher wrote it ("0" for a single process); never
    raises, so an error report can always name it (:func:`scalelab.layout.detect` checks
    that it is an integer inside the world)."""
    env = os.environ if env is None else env
    names = launcher_names(env)
    return (env.get(names.rank) or "0") if names else "0"
