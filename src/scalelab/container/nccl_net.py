"""A site's NCCL network plugin, bound into the image (``container.nccl_net_plugin``).

On Slingshot (libfabric's ``cxi`` provider) and AWS EFA, NCCL reaches the fabric only
through a network plugin, aws-ofi-nccl (``libnccl-net-ofi.so``, or a site's build named
otherwise), linked against the site's own libfabric. An image cannot ship it: it must
match the host's fabric driver and libfabric. Without it NCCL silently falls back to
TCP sockets. The config names the host directory that holds
``libnccl-net-<name>.so`` (and, usually beside it, its libfabric and their dependencies)::

    container:
      nccl_net_plugin:
        dir: /opt/aws-ofi-nccl/lib      # holds libnccl-net-ofi.so
        name: ofi                       # NCCL_NET_PLUGIN: NCCL opens libnccl-net-<name>.so
        lib_dirs: [/opt/cray/libfabric/1.22/lib64]   # optional: libfabric, elsewhere

Inside the container, ``dir`` is bound read-only on ``/opt/scalelab/nccl-net`` and each
``lib_dirs`` entry on ``/opt/scalelab/nccl-net-lib<i>``; ``NCCL_NET_PLUGIN=<name>`` is set
and those directories go first on ``LD_LIBRARY_PATH``, in front of the image's own value
(Apptainer evaluates ``$LD_LIBRARY_PATH`` in an ``--env`` value after the image's
%environment, measured with 1.4.5; a plain value would replace the image's). First means
first for every library: the site's libfabric then also serves the image's Open MPI,
which is what a Slingshot or EFA site wants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scalelab.errors import UsageError

#: Where the plugin directory appears inside the container.
CONTAINER_DIR = "/opt/scalelab/nccl-net"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Variables the plugin sets; the same name in container.env would be ambiguous.
SETS = ("NCCL_NET_PLUGIN", "LD_LIBRARY_PATH")


@dataclass(frozen=True)
class NcclNetPlugin:
    dir: str
    name: str
    lib_dirs: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> NcclNetPlugin:
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: must be a mapping with dir and name")
        unknown = sorted(set(data) - {"dir", "name", "lib_dirs"})
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}: unknown key (known: dir, lib_dirs, name)")
        directory = data.get("dir")
        if not isinstance(directory, str) or not directory.startswith("/"):
            raise UsageError(
                f"{where}.dir: give the absolute host directory holding "
                f"libnccl-net-<name>.so, got {directory!r}"
            )
        name = data.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UsageError(
                f"{where}.name: give the plugin's name (NCCL opens "
                f"libnccl-net-<name>.so), got {name!r}"
            )
        libs = data.get("lib_dirs") or []
        if isinstance(libs, str) or not all(isinstance(d, str) and d.startswith("/") for d in libs):
            raise UsageError(f"{where}.lib_dirs: must be a list of absolute host directories")
        for path in (directory, *libs):
            if ":" in path or "," in path:
                raise UsageError(f"{where}: {path!r}: a bind path may not hold ':' or ','")
        return cls(dir=directory.rstrip("/") or "/", name=name, lib_dirs=tuple(libs))

    @property
    def library(self) -> str:
        """The file NCCL opens for NCCL_NET_PLUGIN=<name>."""
        return f"libnccl-net-{self.name}.so"

    def container_dirs(self) -> list[str]:
        return [CONTAINER_DIR, *(f"{CONTAINER_DIR}-lib{i}" for i in range(len(self.lib_dirs)))]

    def binds(self) -> list[str]:
        hosts = [self.dir, *self.lib_dirs]
        return [f"{h}:{c}:ro" for h, c in zip(hosts, self.container_dirs(), strict=True)]

    def env(self) -> list[tuple[str, str]]:
        front = ":".join(self.container_dirs())
        return [
            ("NCCL_NET_PLUGIN", self.name),
            ("LD_LIBRARY_PATH", front + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"),
        ]
