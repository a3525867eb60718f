"""Podman as a third runtime: ``podman run --rootfs`` on the tree derived from the verified SIF.

Podman cannot open a SIF either; it runs an exploded root filesystem without an image
store with ``--rootfs``. The tree is Charliecloud's (:mod:`scalelab.container.charliecloud`
derives it once per sha256, beside the SIF, atomically), so both runtimes run the same
bytes and the image's environment file (``/ch/environment``) feeds ``--env-file``.

What podman 4.3.1 needed here, measured as root on Debian bookworm (root without
CAP_SYS_RESOURCE, cgroup v1/v2 hybrid; docs/containers.md, "Podman"):

* its default rlimits for root (RLIMIT_NOFILE 1048576, RLIMIT_NPROC) cannot be raised
  without CAP_SYS_RESOURCE ("setrlimit `RLIMIT_NOFILE`: Operation not permitted"), and
  ``--ulimit=host`` or ``-1`` did not help: the ranks get the caller's own limits
  (:func:`ulimits`), as under Apptainer, RLIMIT_NPROC at most kernel.pid_max (podman
  lowered its own to that: a larger value was refused);
* crun 1.8.1 refuses a hybrid cgroup layout ("cgroups in hybrid mode not supported"),
  runc 1.1.5 runs: ``--runtime=runc`` there (:func:`global_flags`);
* ``--userns=keep-id`` is refused as root ("only supported in rootless mode"): only a
  rootless podman gets it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

from scalelab.container import charliecloud

#: cgroup v2 mounted beside v1 controllers: the layout crun 1.8 refuses.
HYBRID_CGROUP2 = Path("/sys/fs/cgroup/unified")
PID_MAX = Path("/proc/sys/kernel/pid_max")
#: The OCI runtime that ran on a hybrid cgroup layout (measured: runc 1.1.5).
HYBRID_OCI_RUNTIME = "runc"
#: Host variables each rank's container inherits (``--env=NAME`` or ``--env=PREFIX*``:
#: podman copies them from its own environment when set). Apptainer and ch-run pass the
#: whole host environment; podman passes none, so a rank would not know who it is. These
#: are what :mod:`scalelab.layout` and the training loop read: the launchers' rank and
#: rendezvous variables (torchrun, Horovod, Open MPI, PMIx/PMI, Slurm), threads, the
#: communication libraries' settings, scalelab's own (run lock, tracking).
HOST_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_*",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HOROVOD_*",
    "OMPI_*",
    "PMIX_*",
    "PMI_*",
    "SLURM_*",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_VISIBLE_DEVICES",
    "NCCL_*",
    "GLOO_*",
    "SCALELAB_*",
)
#: The variable podman sets in every container it runs (``container=podman``).
MARK_VAR, MARK = "container", "podman"
_LIMITS = (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC))


def global_flags(hybrid: Path = HYBRID_CGROUP2) -> list[str]:
    """Podman's own flags before ``run``: runc on a hybrid cgroup layout, else its default."""
    return [f"--runtime={HYBRID_OCI_RUNTIME}"] if os.path.ismount(hybrid) else []


def _pid_max() -> int | None:
    try:
        return int(PID_MAX.read_text())
    except (OSError, ValueError):
        return None


def ulimits() -> list[str]:
    """``nofile=S:H`` and ``nproc=S:H`` of this process (each rank keeps the step's limits,
    as under Apptainer); RLIMIT_NPROC capped at kernel.pid_max; unlimited stays -1 out."""
    out = []
    cap = _pid_max()
    for name, which in _LIMITS:
        soft, hard = resource.getrlimit(which)
        if soft == resource.RLIM_INFINITY or hard == resource.RLIM_INFINITY:
            continue
        if name == "nproc" and cap:
            soft, hard = min(soft, cap), min(hard, cap)
        out.append(f"{name}={soft}:{hard}")
    return out


def keep_id() -> bool:
    """``--userns=keep-id`` (files the ranks write belong to the user): rootless only."""
    return os.geteuid() != 0


def enter(podman: str) -> charliecloud.Enter:
    """Podman's way into a tree with only PATH set (the derivation's environment probe)."""

    def argv(tree: Path) -> list[str]:
        head = [podman, *global_flags(), "run", "--rm", "--network=none"]
        head += [f"--ulimit={u}" for u in ulimits()]
        return [*head, f"--env=PATH={charliecloud.BASE_PATH}", "--rootfs", str(tree)]

    return argv


def env_file(tree: Path) -> Path:
    """The image's own variables in the derived tree (KEY=VALUE lines)."""
    return tree / charliecloud.ENV_FILE


#: Podman's own markers are unreliable for a ``--rootfs`` run (measured, 4.3.1 as root:
#: neither ``container=podman`` nor ``/run/.containerenv`` reaches the process), so scalelab
#: sets its own variable in every ``podman run`` it builds.
RUNTIME_VAR = ("SCALELAB_CONTAINER_RUNTIME", "podman")
CONTAINERENV = Path("/run/.containerenv")


def inside(environ: Mapping[str, str]) -> bool:
    """True in a process podman started (scalelab's variable, or podman's own markers)."""
    name, value = RUNTIME_VAR
    own = environ.get(name) == value or environ.get(MARK_VAR) == MARK
    return own or CONTAINERENV.is_file()
