"""Where am I in the job? One rank layout, whatever launched the process.

The trainer never asks "was I started by torchrun or srun?"; it asks
:func:`detect` for a :class:`Layout` and uses that everywhere. Detection reads
environment variables only (no torch import), so it also works in a bare
``python -c``.

Precedence, first match wins (documented because launchers nest):

1. **torchrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): torchrun started
   under ``srun`` also sees the ``SLURM_*`` variables of its srun task, but the
   ranks it spawned are described by its own variables.
2. **horovodrun** (``HOROVOD_RANK``, ``HOROVOD_SIZE``): same reasoning.
3. **Open MPI** (``OMPI_COMM_WORLD_RANK``/``SIZE``/``LOCAL_RANK``): ``mpirun``
   inside a Slurm allocation inherits the allocation's ``SLURM_*`` variables,
   which describe the batch step, not the MPI ranks.
4. **MPICH / Intel MPI** (``PMI_RANK``, ``PMI_SIZE``).
5. **Slurm** (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``):
   tasks of an ``srun`` step (plain or ``--mpi=pmix``). The batch script itself
   (no ``srun``) has no step variables and counts as a single process, so a
   ``python`` started directly in an ``sbatch`` script never waits for peers
   that will not come.
6. **single** process.

Rendezvous address (``master_addr``) for torch.distributed: ``MASTER_ADDR``
when set, else the launcher's answer (first host of the Slurm step node list;
127.0.0.1 when all MPI ranks share one node; rank 0's hostname broadcast over
mpi4py otherwise). Port: ``MASTER_PORT`` when set, else derived from the job
identity so concurrent jobs on one node rarely collide.
"""

from __future__ import annotations

import os
import re
import socket
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from scalelab.errors import UsageError
from scalelab.rank import HOROVODRUN, MPICH, OPENMPI, SLURM, TORCHRUN, Names, launcher_names

#: Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's
#: ephemeral range (32768-60999 by default). Inside it, a rank that dials rank 0's store
#: before the store listens can be given the store's own port as its source port and
#: connect to itself (TCP self-connect), then wait for ever: the rare two-rank hang.
PORT_BASE = 20000
PORT_SPAN = 12000


@dataclass(frozen=True)
class Layout:
    """The position of this process in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    #: torchrun | horovodrun | openmpi | mpich | slurm | single
    launcher: str
    #: How many times torchrun's elastic agent restarted the workers before this one
    #: (``TORCHELASTIC_RESTART_COUNT``; 0 for every other launcher): > 0 means a failure
    #: or a membership change happened, and the world size may differ from the start's.
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints; the others stay quiet."""
        return self.rank == 0


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm host list such as ``n[1-3,5],gpu[01-02]`` into host names.

    Supports comma-separated items, several bracket groups per item (their
    cartesian product, as Slurm does) and zero-padded ranges.
    """
    spec = spec.strip()
    if not spec:
        return []
    hosts: list[str] = []
    for item in _split_top_level(spec):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {spec!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {spec!r}")
    items.append("".join(current))
    return [i for i in items if i]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    prefix, rest = item[: match.start()], item[match.end() :]
    tails = _expand_item(rest)
    out = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in host list item {item!r}")
            numbers = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
        else:
            if not part:
                raise ValueError(f"empty element in host list item {item!r}")
            numbers = [part]
        out.extend(prefix + n + tail for n in numbers for tail in tails)
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's ``SLURM_TASKS_PER_NODE`` form, e.g. ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise UsageError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def _port_from(key: str) -> int:
    return PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN


def port_for(key: str) -> int:
    """A port derived from a job's identity (below the ephemeral range, see
    :data:`PORT_BASE`): the rendezvous port of an elastic launch."""
    return _port_from(key)


def _master_port(env: Mapping[str, str], fallback_key: str) -> int:
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    return _port_from(fallback_key)


def detect(env: Mapping[str, str] | None = None, *, allow_mpi_query: bool = True) -> Layout:
    """Return this process's :class:`Layout` (see the module docstring for precedence).

    ``allow_mpi_query`` permits importing mpi4py to learn rank 0's host name
    when MPI ranks span several nodes and ``MASTER_ADDR`` is not set.
    """
    env = os.environ if env is None else env
    names = launcher_names(env)
    if names is TORCHRUN:
        return _from_torchrun(env)
    if names is HOROVODRUN:
        return _from_horovodrun(env)
    if names is OPENMPI:
        return _from_openmpi(env, allow_mpi_query)
    if names is MPICH:
        return _from_mpich(env, allow_mpi_query)
    if names is SLURM:
        return _from_slurm(env)
    return Layout(
        0,
        1,
        0,
        1,
        env.get("MASTER_ADDR", "127.0.0.1"),
        _master_port(env, f"single-{os.getpid()}"),
        "single",
    )


def _checked(layout: Layout) -> Layout:
    if not 0 <= layout.rank < layout.world_size:
        raise UsageError(
            f"{layout.launcher} layout: rank {layout.rank} outside world size {layout.world_size}"
        )
    if not 0 <= layout.local_rank < layout.local_world_size:
        raise UsageError(
            f"{layout.launcher} layout: local rank {layout.local_rank} outside "
            f"local world size {layout.local_world_size}"
        )
    return layout


def _read(
    env: Mapping[str, str], names: Names, master_addr: Callable[[bool], str], port_key: str
) -> Layout:
    """The layout from ``names``' variables; ``master_addr(all_local)`` finds rank 0's host."""
    world = _int(env, names.size)
    local_world = _int(env, names.local_size, world)
    return _checked(
        Layout(
            rank=_int(env, names.rank),
            world_size=world,
            local_rank=_int(env, names.local_rank, 0),
            local_world_size=local_world,
            master_addr=master_addr(local_world == world),
            master_port=_master_port(env, port_key),
            launcher=names.launcher,
        )
    )


#: What torchrun's agent sets in each worker: restarts of the worker group so far.
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"


def _from_torchrun(env: Mapping[str, str]) -> Layout:
    layout = _read(env, TORCHRUN, lambda _: env.get("MASTER_ADDR", "127.0.0.1"), "torchrun")
    return replace(layout, restart_count=_int(env, RESTART_COUNT, 0))


def _from_horovodrun(env: Mapping[str, str]) -> Layout:
    addr = env.get("MASTER_ADDR", env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1"))
    return _read(
        env, HOROVODRUN, lambda _: addr, "horovodrun-" + env.get("HOROVOD_GLOO_RENDEZVOUS_PORT", "")
    )


def _mpi_master_addr(env: Mapping[str, str], all_local: bool, allow_query: bool) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if all_local:
        return "127.0.0.1"
    if not allow_query:
        raise UsageError("MPI ranks span several nodes: set MASTER_ADDR to rank 0's host name")
    from mpi4py import MPI  # noqa: PLC0415 - only needed for multi-node MPI launches

    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def _from_openmpi(env: Mapping[str, str], allow_query: bool) -> Layout:
    job_key = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_orte_hnp_uri") or "openmpi"
    return _read(env, OPENMPI, lambda local: _mpi_master_addr(env, local, allow_query), job_key)


def _from_mpich(env: Mapping[str, str], allow_query: bool) -> Layout:
    return _read(
        env,
        MPICH,
        lambda local: _mpi_master_addr(env, local, allow_query),
        "mpich-" + env.get("PMI_FD", env.get("PMI_PORT", "")),
    )


def _from_slurm(env: Mapping[str, str]) -> Layout:
    world = _int(env, SLURM.size)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    try:
        hosts = expand_hostlist(nodelist)
        per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else [world]
    except ValueError as exc:
        raise UsageError(f"slurm layout: {exc}") from None
    node_id = _int(env, "SLURM_NODEID", 0)
    local_world = per_node[node_id] if node_id < len(per_node) else per_node[-1]
    if env.get("MASTER_ADDR"):
        master = env["MASTER_ADDR"]
    elif hosts:
        master = hosts[0]
    else:
        raise UsageError("slurm layout: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to find rank 0")
    job = env.get("SLURM_JOB_ID", "0")
    step = env.get("SLURM_STEP_ID", "0")
    return _checked(
        Layout(
            rank=_int(env, SLURM.rank),
            world_size=world,
            local_rank=_int(env, SLURM.local_rank, 0),
            local_world_size=local_world,
            master_addr=master,
            master_port=_master_port(env, f"slurm-{job}.{step}"),
            launcher="slurm",
        )
    )


if __name__ == "__main__":  # `python -m scalelab.layout`: what does this process see?
    import json
    import sys
    from dataclasses import asdict

    # One write per line: ranks sharing a pipe then cannot interleave within a line.
    sys.stdout.write(json.dumps({**asdict(detect()), "hostname": socket.gethostname()}) + "\n")
    sys.stdout.flush()
