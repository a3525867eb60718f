"""The ``container:`` section of a workflow config: one pydantic model, validated once.

The study config (:class:`scalelab.study.config.StudyConfig`) embeds this model, so the
workflow schema and the container commands (``scalelab container exec/pull/verify
--config``) accept the same keys and refuse the same typos: one UsageError naming
``container.<key>`` (the shared formatter of :mod:`scalelab.config_types`).

The srun side of a containerized job (``--mpi``, extra srun flags) is not here: it is
``launch.srun_mpi`` and ``launch.extra_srun_args``, which the workflow's ranks use with
or without a container, so one setting means one thing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from scalelab import docload
from scalelab.config_types import Section, first_error, show
from scalelab.container.nccl_net import SETS as NCCL_NET_SETS
from scalelab.container.nccl_net import NcclNetPlugin
from scalelab.container.registry import parse_ref
from scalelab.errors import UsageError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RUNTIMES = ("auto", "apptainer", "singularity", "charliecloud", "podman")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

NonEmpty = Annotated[str, Field(min_length=1)]


def _userns_schema(schema: dict[str, Any]) -> None:
    """userns in the schema: YAML's true/false are booleans."""
    schema.pop("type", None)
    schema["enum"] = ["auto", True, False, "true", "false"]


class NcclNetSection(Section):
    """A site's NCCL network plugin directory (see :mod:`scalelab.container.nccl_net`)."""

    dir: NonEmpty
    """Absolute host directory holding libnccl-net-<name>.so."""
    name: NonEmpty
    """The plugin's name: NCCL_NET_PLUGIN, NCCL opens libnccl-net-<name>.so."""
    lib_dirs: list[NonEmpty] = Field(default_factory=list)
    """Further absolute host directories its libraries need (the site's libfabric)."""


class ContainerConfig(Section):
    """Run every training rank inside an Apptainer image (see docs/containers.md):
    ``srun ... apptainer exec [--nv] IMAGE scalelab train ...``, the container call inside
    srun. The srun side comes from ``launch``."""

    enabled: bool = False
    """false runs on the host and ignores the other keys."""
    image: str | None = None
    """.sif path on a filesystem every node sees (or an oras://, docker:// URI); with
    ``registry``, the path the image is pulled onto."""
    sha256: str | None = None
    """Pinned sha256 (64 hex) of the .sif file (``sha256sum IMAGE``, taken after signing,
    which changes the file), checked before any job starts and recorded in provenance (a
    ``sha256:`` prefix is dropped). Not the registry's manifest digest."""
    registry: str | None = None
    """Where the workflow pulls ``image`` from: ``oras://HOST[:PORT]/NAME:TAG``, optionally
    ``@sha256:<manifest digest>`` (what ``scalelab container push`` prints; the manifest's,
    not the file's). The submit host pulls it once per study when ``image`` is missing,
    and checks ``sha256`` (required) then ``trusted_keys`` before the file is renamed
    into place. Credentials never go here: ``apptainer registry login`` keeps them."""
    trusted_keys: list[NonEmpty] = Field(default_factory=list)
    """PEM public key files: when set, an image is accepted only signed by one of them
    (``apptainer sign --key``), by ``container verify``, ``container pull`` and the
    workflow before any job; an unsigned or otherwise signed image is refused."""
    runtime: Literal["auto", "apptainer", "singularity", "charliecloud", "podman"] = "auto"
    """Which runtime runs the image (auto prefers apptainer). charliecloud: ``ch-run`` on a
    directory scalelab derives from the verified .sif once per sha256, beside it
    (``sha256-<hex>.ch``); needs unsquashfs, ``nv: false``, binds without options, no
    nccl_net_plugin. podman: ``podman run --rootfs`` on that same directory, with the
    host's network, IPC and PID namespaces (docs/containers.md)."""
    nv: bool = True
    """Pass --nv (bind the host's NVIDIA driver); false for the CPU image and for
    Charliecloud (which has no --nv: ``ch-fromhost --nvidia`` on the derived directory).
    Podman: ``--device nvidia.com/gpu=all`` (CDI; the site generates its spec)."""
    userns: Literal["auto", "true", "false"] = Field("auto", json_schema_extra=_userns_schema)
    """Pass --userns to ``apptainer exec``: auto does so where root lacks the capabilities
    a setuid-free exec needs (as on the test machines)."""
    binds: list[NonEmpty] = Field(default_factory=list)
    """Extra --bind specs SRC[:DST[:OPTS]] for data, scratch and results (Charliecloud:
    SRC[:DST])."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables set inside the container (--env KEY=VALUE)."""
    exec_flags: list[NonEmpty] = Field(default_factory=list)
    """Extra flags of the runtime's exec: ``apptainer exec`` (e.g. --cleanenv), ``ch-run``
    with runtime charliecloud (e.g. --private-tmp), or ``podman run`` with runtime podman
    (e.g. --cgroups=disabled)."""

    nccl_net_plugin: NcclNetSection | None = None
    """A site's NCCL network plugin (aws-ofi-nccl and its libfabric): {dir, name, lib_dirs};
    bound into the container read-only, NCCL_NET_PLUGIN set, its directories first on
    LD_LIBRARY_PATH (scalelab.container.nccl_net). Not in ``binds``/``env``: the runtime
    adds them (:attr:`bind_specs`, :attr:`env_pairs`)."""

    @field_validator("nccl_net_plugin", mode="before")
    @classmethod
    def _nccl_net(cls, value: Any) -> Any:
        """The plugin's own checks first: one line naming its key (absolute paths, a name
        NCCL can open, no ':' or ',' in a bind path)."""
        if value is not None:
            NcclNetPlugin.from_mapping(value, "container.nccl_net_plugin")
        return value

    @field_validator("userns", mode="before")
    @classmethod
    def _userns(cls, value: Any) -> Any:
        """YAML true/false read as booleans."""
        return ("true" if value else "false") if isinstance(value, bool) else value

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256(cls, value: Any) -> Any:
        """64 lower-case hex digits (a ``sha256:`` prefix is dropped), or None."""
        if value is None:
            return None
        if not isinstance(value, str):  # YAML reads an all-digit value as a number
            raise ValueError(f"expected 64 hex digits as a quoted string, got {show(value)}")
        digest = value.lower().removeprefix("sha256:")
        if not SHA256_RE.match(digest):
            raise ValueError(f"expected 64 hex digits, got {show(value)}")
        return digest

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        """An ``oras://`` reference with a tag or a manifest digest, and no credentials."""
        if value is not None:
            try:
                parse_ref(value, "registry")
            except UsageError as exc:
                raise ValueError(str(exc).removeprefix("registry: ")) from None
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _VAR_RE.match(key):
                raise ValueError(f"@{key}:not a valid variable name")
        return env

    @model_validator(mode="after")
    def _plugin_owns_its_variables(self) -> ContainerConfig:
        if self.nccl_net_plugin is not None:
            clash = sorted(set(NCCL_NET_SETS) & set(self.env))
            if clash:
                raise UsageError(
                    f"container.env.{clash[0]}: set by "
                    "container.nccl_net_plugin; remove it from env"
                )
        return self

    @model_validator(mode="after")
    def _charliecloud_limits(self) -> ContainerConfig:
        """What Apptainer offers and ch-run does not: refused, naming the field."""
        if self.runtime != "charliecloud" or not self.enabled:
            return self
        if self.nv:
            raise ValueError(
                "@nv:Charliecloud has no --nv: set nv: false (for GPUs, add the host's "
                "driver to the derived image with ch-fromhost --nvidia; docs/containers.md)"
            )
        if self.userns == "false":
            raise ValueError("@userns:ch-run always runs in a user namespace; use auto")
        if self.nccl_net_plugin is not None:
            raise ValueError(
                "@nccl_net_plugin:needs read-only binds, which ch-run 0.31 lacks; use apptainer"
            )
        if self.is_uri:
            raise ValueError("@image:Charliecloud derives its image from a local .sif path")
        for i, spec in enumerate(self.binds):
            if spec.count(":") > 1:
                raise ValueError(
                    f"@binds.{i}:{spec!r}: bind options have no Charliecloud equivalent; "
                    "give SRC or SRC:DST"
                )
        return self

    @model_validator(mode="after")
    def _podman_limits(self) -> ContainerConfig:
        """What Apptainer offers and ``podman run --rootfs`` does not: refused, naming the field."""
        if self.runtime != "podman" or not self.enabled:
            return self
        if self.userns == "true":
            raise ValueError(
                "@userns:podman has no --userns like Apptainer's (rootless podman always "
                "runs in one; scalelab adds --userns=keep-id when not root); use auto"
            )
        if self.is_uri:
            raise ValueError("@image:podman runs a tree derived from a local .sif path")
        return self

    @model_validator(mode="after")
    def _registry_needs_a_path_and_a_pin(self) -> ContainerConfig:
        if self.registry and self.is_uri:
            raise ValueError("@image:with registry, give the .sif path to pull it onto")
        if self.registry and not self.sha256:
            raise ValueError(
                "@sha256:pin the file's sha256 of the image in the registry (`scalelab "
                "container push` prints it)"
            )
        return self

    @model_validator(mode="after")
    def _image_when_enabled(self) -> ContainerConfig:
        if self.enabled and not (self.image or "").strip():
            raise ValueError("@image:give the path of the .sif image (or a URI)")
        return self

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, where: str = "container"
    ) -> ContainerConfig:
        """Validate a mapping; accepts the whole config (with a `container` key) or the
        section. A section given on its own means "run in this image": ``enabled``
        defaults to true and ``image`` is required."""
        data = _section(data, where)
        try:
            return cls.model_validate({"enabled": True, **data})
        except ValidationError as exc:
            path, reason = first_error(exc, cls)
            raise UsageError(
                f"{where}.{path}: {reason}" if path else f"{where}: {reason}"
            ) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ContainerConfig:
        """Load the `container:` section of a YAML config file."""
        return cls.from_mapping(_file_section(path, "container"))

    @property
    def is_uri(self) -> bool:
        """True for oras://, docker://, library:// ... images (not a local file)."""
        return "://" in (self.image or "")

    @property
    def env_pairs(self) -> tuple[tuple[str, str], ...]:
        """``env`` as (KEY, VALUE) pairs, in the order written, then the NCCL plugin's."""
        plugin = self.nccl_plugin
        return (*self.env.items(), *(plugin.env() if plugin else ()))

    @property
    def nccl_plugin(self) -> NcclNetPlugin | None:
        """The bound NCCL network plugin, or None."""
        p = self.nccl_net_plugin
        return (
            None
            if p is None
            else NcclNetPlugin.from_mapping(p.model_dump(), "container.nccl_net_plugin")
        )

    @property
    def bind_specs(self) -> list[str]:
        """``binds``, then the NCCL plugin's read-only binds (each once)."""
        plugin = self.nccl_plugin
        extra = [b for b in (plugin.binds() if plugin else []) if b not in self.binds]
        return [*self.binds, *extra]


def _file_section(path: str | Path, key: str) -> Mapping[str, Any]:
    """The ``key`` section of a YAML config file (read by the one document loader)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")

    data = docload.load(p, mapping=False)
    if not isinstance(data, Mapping) or key not in data:
        raise UsageError(f"{p}: has no `{key}:` section")
    return data[key]


def launch_srun(path: str | Path) -> tuple[str, tuple[str, ...]]:
    """(srun --mpi plugin, extra srun flags) of a workflow config file: its ``launch``
    section's ``srun_mpi`` and ``extra_srun_args`` (pmix and none when absent), for
    ``scalelab container exec --srun --config FILE``."""
    p = Path(path)

    data = docload.load(p, mapping=False) if p.is_file() else None
    launch = data.get("launch") if isinstance(data, Mapping) else None
    if launch is None:
        return "pmix", ()
    if not isinstance(launch, Mapping):
        raise UsageError(f"{p}: launch: expected a mapping")
    mpi = launch.get("srun_mpi", "pmix")
    if not isinstance(mpi, str) or not re.fullmatch(r"[A-Za-z0-9_]+", mpi):
        raise UsageError(f"{p}: launch.srun_mpi: {mpi!r} is not an srun --mpi plugin name")
    flags = launch.get("extra_srun_args") or []
    if isinstance(flags, str) or not all(isinstance(f, str) and f for f in flags):
        raise UsageError(f"{p}: launch.extra_srun_args: must be a list of non-empty strings")
    return mpi, tuple(flags)


def _section(data: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    """The `container` section, from the whole config or the section itself."""
    if data is None:
        raise UsageError(f"{where}: missing (need at least {where}.image)")
    if "container" in data and isinstance(data["container"], Mapping):
        data = data["container"]
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: must be a mapping, got {type(data).__name__}")
    return data
