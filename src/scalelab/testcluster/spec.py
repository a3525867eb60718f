"""What the test cluster looks like (names, addresses, ports) and what a machine needs for it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path(
    os.environ.get("SCALELAB_TESTCLUSTER_DIR", "/var/lib/scalelab/testcluster")
)
REQUIRED_PROGRAMS = [
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "ip",
    "unshare",
    "nsenter",
    "mount",
    "srun",
    "sbatch",
    "scontrol",
    "sinfo",
    "squeue",
    "scancel",
]
APT_PACKAGES = "slurm-wlm munge libpmix2 libpmix-dev iproute2 util-linux"


class ClusterError(RuntimeError):
    """The cluster could not be brought up or torn down; the message says which daemon."""


@dataclass
class ClusterSpec:
    """Shape of the test cluster. Two clusters can coexist if prefix, subnet and ports differ."""

    nodes: int = 2
    cpus_per_node: int = 2
    #: Stand-in GPUs per node: the scheduler accepts or rejects the geometry of GPU jobs
    #: for real and sets CUDA_VISIBLE_DEVICES, while their ranks run on the CPU.
    gpus_per_node: int = 2
    mem_mb_per_node: int = 4096
    state_dir: Path = DEFAULT_STATE_DIR
    prefix: str = "sl"
    subnet: str = "10.201.0"
    ctld_port: int = 6817
    slurmd_port: int = 6818
    #: Paths every node must see at the same path (project, venv, data).
    shared: list[Path] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kw) -> ClusterSpec:
        """A spec whose identity (state dir, name prefix, subnet, ports) may come from
        SCALELAB_TESTCLUSTER_{DIR,PREFIX,SUBNET,PORT}: two suites on one machine then each
        get a cluster of their own (PORT is slurmctld's; slurmd takes PORT+1)."""
        env = os.environ if env is None else env
        if env.get("SCALELAB_TESTCLUSTER_DIR"):
            kw.setdefault("state_dir", Path(env["SCALELAB_TESTCLUSTER_DIR"]))
        if env.get("SCALELAB_TESTCLUSTER_PREFIX"):
            kw.setdefault("prefix", env["SCALELAB_TESTCLUSTER_PREFIX"])
        if env.get("SCALELAB_TESTCLUSTER_SUBNET"):
            kw.setdefault("subnet", env["SCALELAB_TESTCLUSTER_SUBNET"])
        if env.get("SCALELAB_TESTCLUSTER_PORT"):
            port = int(env["SCALELAB_TESTCLUSTER_PORT"])
            kw.setdefault("ctld_port", port)
            kw.setdefault("slurmd_port", port + 1)
        return cls(**kw)

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def node_addr(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    @property
    def host_addr(self) -> str:
        return f"{self.subnet}.1"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def veth(self, i: int) -> str:
        return f"{self.prefix}v{i}"


def missing_requirements() -> list[str]:
    """Why this machine cannot run the test cluster (empty when it can)."""
    problems = [
        f"{p} not found (apt-get install {APT_PACKAGES})"
        for p in REQUIRED_PROGRAMS
        if not shutil.which(p)
    ]
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, mounts, slurmd)")
    return problems
