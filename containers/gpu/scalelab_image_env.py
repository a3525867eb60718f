"""Start-up of every Python process in the scalelab GPU image (a ``.pth`` hook of the venv).

containers/recipe.py installs this module in the image's venv site-packages, with
``scalelab-image-env.pth`` beside it; that file's one line (``import scalelab_image_env``)
runs when ``site`` processes site-packages, before any user code. It acts only inside the
image (``SCALELAB_IMAGE`` is set by the image's %environment).

Why a ``.pth`` hook and not the venv's ``sitecustomize.py``: Debian's and Ubuntu's
python3.11 packages ship ``/usr/lib/python3.11/sitecustomize.py`` (a link to
/etc/python3.11/sitecustomize.py), which comes before the venv's site-packages on
``sys.path``; ``import sitecustomize`` finds that one and a venv's file is never run
(measured with Debian's ``/usr/bin/python3.11 -m venv``; tests/test_image_env_hook.py).
Every ``.pth`` file of every site directory is read, whatever other ``sitecustomize``
exists. Why not ``apptainer exec --cleanenv`` with an explicit ``--env`` list instead:
``--cleanenv`` also drops what the launcher and Slurm hand each rank (SLURM_*, PMIX_*,
the user's NCCL_*/GLOO_* choices, CUDA_VISIBLE_DEVICES), so every site would have to
re-list them; the hook drops only what is known to break the image's MPI. ``python -S``
or ``-I`` skips the hook (as it would skip sitecustomize).

Why here and not in %environment: Apptainer evaluates %environment before it merges
the host's variables in; the script cannot see them, and a host variable the image
does not set itself reaches the process unchanged (measured with Apptainer 1.4.5:
an image export beats the host's value, ``--env``/``APPTAINERENV_`` beat the
image's). The image therefore pins what it can name (OPAL_PREFIX and friends,
PMIX_MCA_gds) in %environment, and everything open-ended is settled here, in the
process, before MPI_Init, NCCL or Gloo read the environment. Every rank of this
image starts as Python (scalelab, mpi4py, Horovod, torchrun; horovodrun passes
the cleaned environment on to the mpirun it starts).

1. Host MPI settings. A site's MPI module exports OMPI_MCA_*/PRTE_MCA_* (and
   install-directory overrides OPAL_*DIR) for the host's Open MPI; in the image's
   Open MPI they select components that do not exist here (measured: a typical
   ``OMPI_MCA_btl=openib,self`` makes MPI_Init fail). They are dropped, and their
   names recorded in SCALELAB_DROPPED_MPI_ENV, unless this process was started by
   an mpirun (OMPI_COMM_WORLD_SIZE set): those are that job's own ``--mca`` values.
2. Settings meant for the image's MPI: ``SCALELAB_OMPI_MCA_<name>=<value>``
   becomes ``OMPI_MCA_<name>=<value>`` (likewise ``SCALELAB_PRTE_MCA_*`` and
   ``SCALELAB_PMIX_MCA_*``, e.g. ``SCALELAB_PMIX_MCA_gds=ds21``).
3. Interfaces as exclusions. SCALELAB_IFACE_EXCLUDE (default ``lo,docker``) lists
   interface-name prefixes to avoid. NCCL is left to choose its own interface (it prefers
   ``ib*`` and the subnet of ``NCCL_COMM_ID``; the image writes no NCCL_SOCKET_IFNAME):
   only a list the user sets here becomes ``NCCL_SOCKET_IFNAME=^<list>``. Gloo takes
   names only: when GLOO_SOCKET_IFNAME is unset and exactly one interface is up and not excluded,
   it is set to that one; otherwise Gloo keeps its own hostname lookup. A value
   the user or the launcher set always wins; nothing here touches GPU or CPU
   binding (CUDA_VISIBLE_DEVICES and the like belong to Slurm).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

#: Prefixes of variables that configure an Open MPI installation's components.
MCA_PREFIXES = ("OMPI_MCA_", "PRTE_MCA_")
#: Open MPI's install-directory overrides (opal/mca/installdirs/env); OPAL_PREFIX is
#: pinned by the image's %environment, these would still redirect parts of it.
OPAL_DIRS = ("OPAL_EXEC_PREFIX", "OPAL_BINDIR", "OPAL_SBINDIR", "OPAL_LIBEXECDIR",
             "OPAL_DATAROOTDIR", "OPAL_DATADIR", "OPAL_SYSCONFDIR", "OPAL_SHAREDSTATEDIR",
             "OPAL_LOCALSTATEDIR", "OPAL_LIBDIR", "OPAL_INCLUDEDIR", "OPAL_INFODIR",
             "OPAL_MANDIR", "OPAL_PKGDATADIR", "OPAL_PKGLIBDIR", "OPAL_PKGINCLUDEDIR")
MAPPED_PREFIXES = ("SCALELAB_OMPI_MCA_", "SCALELAB_PRTE_MCA_", "SCALELAB_PMIX_MCA_")
DEFAULT_EXCLUDE = "lo,docker"


def clean_mpi_env(env: MutableMapping[str, str]) -> list[str]:
    """Drop host MPI settings (unless started by mpirun), apply SCALELAB_* ones; return drops."""
    dropped: list[str] = []
    if "OMPI_COMM_WORLD_SIZE" not in env:
        for key in sorted(env):
            if key.startswith(MCA_PREFIXES) or key in OPAL_DIRS:
                del env[key]
                dropped.append(key)
    for key in sorted(env):
        if key.startswith(MAPPED_PREFIXES):
            env[key[len("SCALELAB_"):]] = env[key]
    if dropped:
        env["SCALELAB_DROPPED_MPI_ENV"] = ",".join(dropped)
    return dropped


def excluded_prefixes(env: MutableMapping[str, str]) -> list[str]:
    return [p for p in env.get("SCALELAB_IFACE_EXCLUDE", DEFAULT_EXCLUDE).split(",") if p]


def gloo_interface(env: MutableMapping[str, str], net: Path = Path("/sys/class/net")) -> str | None:
    """The one up, non-excluded interface, or None (then Gloo resolves the hostname)."""
    exclude = excluded_prefixes(env)
    candidates = []
    try:
        entries = sorted(net.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name.startswith(tuple(exclude)):
            continue
        try:
            state = (entry / "operstate").read_text().strip()
        except OSError:
            continue
        if state == "up":
            candidates.append(entry.name)
    return candidates[0] if len(candidates) == 1 else None


def set_interfaces(env: MutableMapping[str, str], net: Path = Path("/sys/class/net")) -> None:
    if "SCALELAB_IFACE_EXCLUDE" in env and not env.get("NCCL_SOCKET_IFNAME"):
        env["NCCL_SOCKET_IFNAME"] = "^" + ",".join(excluded_prefixes(env))
    if not env.get("GLOO_SOCKET_IFNAME"):
        name = gloo_interface(env, net)
        if name:
            env["GLOO_SOCKET_IFNAME"] = name


def apply(env: MutableMapping[str, str]) -> None:
    """Everything above, on `env` (os.environ in the image)."""
    clean_mpi_env(env)
    set_interfaces(env)


if os.environ.get("SCALELAB_IMAGE"):
    apply(os.environ)
