"""The ``container:`` section of a workflow config, validated once.

Every consumer (the CLI, the Snakemake wiring, provenance) reads the same
dataclass, so a typo in a key fails the same way everywhere: one UsageError
naming ``container.<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from scalelab.errors import UsageError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RUNTIMES = ("auto", "apptainer", "singularity")


@dataclass(frozen=True)
class ContainerConfig:
    """How jobs run inside the image."""

    image: str
    """Path of the .sif on a filesystem every node sees (or an oras://, docker:// URI)."""
    enabled: bool = True
    """False: jobs run on the host; the other keys are ignored."""
    sha256: str | None = None
    """Pinned sha256 (64 hex) of the .sif; `verify` and provenance compare against it."""
    runtime: str = "auto"
    """auto (apptainer, else singularity), apptainer or singularity."""
    nv: bool = True
    """Pass --nv (bind the host's NVIDIA driver); false for the CPU image."""
    binds: tuple[str, ...] = ()
    """Bind specs SRC[:DST[:OPTS]] for data, scratch and results."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables set inside the container (--env KEY=VALUE)."""
    exec_flags: tuple[str, ...] = ()
    """Extra `apptainer exec` flags, e.g. --cleanenv or --contain."""
    srun_mpi: str = "pmix"
    """srun --mpi plugin: pmix for Open MPI + PMIx images, pmi2 (or cray_shasta) for MPICH."""
    srun_flags: tuple[str, ...] = ()
    """Extra srun flags, e.g. --cpu-bind=cores or --gpus-per-task=1."""
    userns: str = "auto"
    """Pass --userns to `apptainer exec`: true, false, or auto (where root lacks capabilities,
    e.g. in containers and CI; see runtime.root_lacks_capabilities)."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None,
                     where: str = "container") -> ContainerConfig:
        """Validate a mapping; accepts the whole config (with a `container` key) or the section."""
        data = _section(data, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}: unknown key "
                             f"(known: {', '.join(sorted(known))})")
        image = data.get("image")
        if not isinstance(image, str) or not image.strip():
            raise UsageError(f"{where}.image: give the path of the .sif image (or a URI)")
        sha = _sha256(data.get("sha256"), where)
        runtime = data.get("runtime", "auto")
        if runtime not in RUNTIMES:
            raise UsageError(f"{where}.runtime: choose one of {', '.join(RUNTIMES)}, "
                             f"got {runtime!r}")
        env = _env(data.get("env") or {}, where)
        srun_mpi = str(data.get("srun_mpi", "pmix"))
        if not re.match(r"^[a-z0-9_]+$", srun_mpi):
            raise UsageError(f"{where}.srun_mpi: {srun_mpi!r} is not an srun --mpi plugin name")
        userns = _userns(data.get("userns", "auto"), where)
        for key in ("enabled", "nv"):
            if key in data and not isinstance(data[key], bool):
                raise UsageError(f"{where}.{key}: must be true or false")
        return cls(
            image=image.strip(),
            enabled=bool(data.get("enabled", True)),
            sha256=sha,
            runtime=runtime,
            nv=bool(data.get("nv", True)),
            binds=_str_list(data, "binds", where),
            env=tuple((str(k), str(v)) for k, v in env.items()),
            exec_flags=_str_list(data, "exec_flags", where),
            srun_mpi=srun_mpi,
            srun_flags=_str_list(data, "srun_flags", where),
            userns=userns,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ContainerConfig:
        """Load the `container:` section of a YAML config file."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"config file not found: {p}")
        from scalelab import docload

        data = docload.load(p, mapping=False)
        if not isinstance(data, Mapping) or "container" not in data:
            raise UsageError(f"{p}: has no `container:` section")
        return cls.from_mapping(data["container"])

    @property
    def is_uri(self) -> bool:
        """True for oras://, docker://, library:// ... images (not a local file)."""
        return "://" in self.image


def _section(data: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    """The `container` section, from the whole config or the section itself."""
    if data is None:
        raise UsageError(f"{where}: missing (need at least {where}.image)")
    if "container" in data and isinstance(data["container"], Mapping):
        data = data["container"]
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: must be a mapping, got {type(data).__name__}")
    return data


def _sha256(sha: Any, where: str) -> str | None:
    """64 lower-case hex digits (a `sha256:` prefix is dropped), or None when unpinned."""
    if sha is None:
        return None
    if not isinstance(sha, str):  # YAML reads an all-digit value as a number
        raise UsageError(f"{where}.sha256: expected 64 hex digits as a quoted string, "
                         f"got {sha!r}")
    digest = sha.lower().removeprefix("sha256:")
    if not SHA256_RE.match(digest):
        raise UsageError(f"{where}.sha256: expected 64 hex digits, got {sha!r}")
    return digest


def _env(env: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(env, Mapping):
        raise UsageError(f"{where}.env: must be a mapping of NAME: value")
    for key in env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            raise UsageError(f"{where}.env: {key!r} is not a variable name")
    return env


def _userns(userns: Any, where: str) -> str:
    """true, false or auto (YAML booleans accepted)."""
    if isinstance(userns, bool):
        userns = "true" if userns else "false"
    if userns not in ("auto", "true", "false"):
        raise UsageError(f"{where}.userns: choose true, false or auto, got {userns!r}")
    return userns


def _str_list(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"{where}.{key}: must be a list of non-empty strings")
    return tuple(value)
