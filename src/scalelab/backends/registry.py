"""Every backend by name: where its class lives and what it can do. The one list.

The run config's choices (``dist.backend``), the provenance and workflow schema enums
(drift-tested), the sweep's backends and the factory (:func:`scalelab.backends.make_backend`)
all come from :data:`REGISTRY`, so a new backend is one entry here plus its module.
Other modules never spell a backend's name: they ask for a capability
(:func:`with_capability`) or a role (:data:`SINGLE`, :data:`DEFAULT`, :data:`MPI`).

Torch-free: the classes are imported only when a backend is made (the workflow reads
this module for every sweep point).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from scalelab.errors import UsageError

#: ``dist.backend: auto``: chosen from the launcher and the world size at start.
AUTO = "auto"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: its name, its class (``module:Class``) and its capabilities."""

    name: str
    target: str
    summary: str
    #: Runs tensor-parallel replicas (``dist.tp > 1``) and pipeline stages (``dist.pp > 1``)
    #: on a pp x dp x tp mesh.
    supports_tp: bool = False
    #: The class that runs ``dist.tp > 1`` or ``dist.pp > 1`` when it is not :attr:`target`.
    tp_target: str | None = None
    #: Parameters, gradients and optimizer state are sharded over the data-parallel ranks.
    shards_state: bool = False
    #: Needs an MPI launch (mpirun, srun --mpi=pmix) or horovodrun for several ranks.
    needs_mpi: bool = False
    #: Runs exactly one process, without communication (the reference every run matches).
    single_process: bool = False

    def class_target(self, tp: int = 1, pp: int = 1) -> str:
        """``module:Class`` of the backend for a layout with ``tp`` tensor-parallel ranks
        and ``pp`` pipeline stages."""
        return self.tp_target if (tp > 1 or pp > 1) and self.tp_target else self.target


REGISTRY: dict[str, BackendSpec] = {
    s.name: s
    for s in (
        BackendSpec(
            "ddp",
            "scalelab.backends.ddp:DDPBackend",
            "DistributedDataParallel; tensor-parallel or pipelined replicas when dist.tp or pp > 1",
            supports_tp=True,
            tp_target="scalelab.backends.tp:TPDataParallel",
        ),
        BackendSpec(
            "horovod",
            "scalelab.backends.horovod:HorovodBackend",
            "horovod.torch allreduce over MPI or gloo",
            needs_mpi=True,
        ),
        BackendSpec(
            "none",
            "scalelab.backends.none:NoneBackend",
            "one process, no communication",
            single_process=True,
        ),
        BackendSpec(
            "fsdp",
            "scalelab.backends.fsdp:FSDPBackend",
            "FSDP2: sharded parameters, gradients and optimizer state",
            supports_tp=True,
            shards_state=True,
        ),
    )
}

#: Backend names, in the order the config's choices and the schemas list them.
BACKENDS: tuple[str, ...] = tuple(REGISTRY)
#: What ``dist.backend`` accepts.
CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)


def with_capability(capability: str) -> tuple[str, ...]:
    """Names of the backends whose spec has ``capability`` (a boolean field) set."""
    return tuple(n for n, s in REGISTRY.items() if getattr(s, capability))


def _only(capability: str) -> str:
    (name,) = with_capability(capability)
    return name


#: The one-process backend (``auto`` for one rank; the single-process baseline of an analysis).
SINGLE: str = _only("single_process")
#: The MPI backend (``auto`` under horovodrun).
MPI: str = _only("needs_mpi")
#: The data-parallel default: ``auto`` for several ranks, commbench's layout, the baseline
#: that memory and speed-up comparisons are made against.
DEFAULT: str = BACKENDS[0]


def resolve(requested: str, launcher: str, world_size: int) -> str:
    """The backend ``requested`` names: ``auto`` is the MPI backend under horovodrun, the
    data-parallel default for several ranks, the one-process backend for one."""
    if requested != AUTO:
        return requested
    if launcher == "horovodrun":
        return MPI
    return DEFAULT if world_size > 1 else SINGLE


def spec(name: str, field: str = "dist.backend") -> BackendSpec:
    """The spec of backend ``name``; a UsageError naming ``field`` for an unknown one."""
    if name not in REGISTRY:
        raise UsageError(
            f"field '{field}': unknown backend {name!r}; valid: {AUTO}, {', '.join(BACKENDS)}"
        )
    return REGISTRY[name]


def load_class(name: str, tp: int = 1, pp: int = 1) -> type:
    """The backend class that runs ``name`` with ``tp`` tensor-parallel ranks and ``pp``
    pipeline stages (imports it)."""
    module, cls = spec(name).class_target(tp, pp).split(":")
    return getattr(importlib.import_module(module), cls)


def name_of(cls: type) -> str:
    """The registered name of backend class ``cls`` (or of its nearest registered base)."""
    for klass in cls.__mro__:
        here = f"{klass.__module__}:{klass.__qualname__}"
        for name, s in REGISTRY.items():
            if here in (s.target, s.tp_target):
                return name
    raise LookupError(f"{cls.__qualname__} is not a registered backend class")
