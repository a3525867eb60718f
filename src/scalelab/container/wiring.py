"""What the workflow needs from the container layer: a command prefix and a provenance record.

The hybrid model: Slurm's ``srun`` starts every rank on the host and each rank
runs ``apptainer exec ... IMAGE scalelab train ...``; MPI inside the container
talks to the host's PMIx server. So the container call goes inside srun,
never around it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scalelab.container import runtime, verify
from scalelab.container.config import ContainerConfig
from scalelab.errors import UsageError


def _config(cfg: ContainerConfig | Mapping[str, Any]) -> ContainerConfig:
    return cfg if isinstance(cfg, ContainerConfig) else ContainerConfig.from_mapping(cfg)


def runtime_name(cfg: ContainerConfig, path: str | None = None) -> str:
    """The executable name for command lines: the configured one, or what PATH offers.

    Raises UsageError when no runtime is installed, so no job is submitted.
    """
    return runtime.require(cfg.runtime, path).name


def exec_prefix(cfg: ContainerConfig | Mapping[str, Any], *, extra_binds: Iterable[str] = (),
                pwd: str | None = None, path: str | None = None) -> list[str]:
    """`apptainer exec --nv --bind ... IMAGE` (the command follows)."""
    c = _config(cfg)
    return runtime.exec_argv(runtime_name(c, path), c.image, [], nv=c.nv,
                             binds=[*c.binds, *extra_binds], env=c.env, flags=c.exec_flags,
                             pwd=pwd)


def container_prefix(cfg: ContainerConfig | Mapping[str, Any], nodes: int = 1,
                     tasks_per_node: int = 1, *, launcher: str = "srun",
                     cpus_per_task: int | None = None, srun_flags: Iterable[str] = (),
                     extra_binds: Iterable[str] = (), pwd: str | None = None,
                     path: str | None = None) -> list[str]:
    """The argv to put before ``scalelab train ...`` in a job.

    launcher ``srun``:  ``srun --mpi=pmix --nodes=N --ntasks-per-node=T [...]
    apptainer exec --nv [--bind ...] IMAGE``; ``none``: the exec part alone (one
    process, e.g. torchrun inside the container). An empty list when the
    container is disabled. UsageError when no runtime is installed or the
    arguments are wrong.
    """
    c = _config(cfg)
    if not c.enabled:
        return []
    if launcher not in ("srun", "none"):
        raise UsageError(f"launcher must be srun or none, got {launcher!r}")
    inner = exec_prefix(c, extra_binds=extra_binds, pwd=pwd, path=path)
    if launcher == "none":
        if nodes * tasks_per_node != 1:
            raise UsageError(f"launcher none runs one process, not {nodes}x{tasks_per_node}")
        return inner
    outer = runtime.srun_argv(nodes=nodes, tasks_per_node=tasks_per_node, mpi=c.srun_mpi,
                              cpus_per_task=cpus_per_task, flags=[*c.srun_flags, *srun_flags])
    return [*outer, *inner]


def inspect_labels(rt: runtime.Runtime, image: str, timeout: float = 120) -> dict[str, str]:
    """The image's labels from `apptainer inspect --json` ({} when it cannot say)."""
    argv = runtime.inspect_argv(rt.name, image)
    try:
        proc = subprocess.run([rt.path, *argv[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    return parse_inspect_labels(proc.stdout)


def parse_inspect_labels(text: str) -> dict[str, str]:
    """Labels out of `inspect --json` output: {"data": {"attributes": {"labels": {...}}}}."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    try:
        labels = data["data"]["attributes"]["labels"]
    except (KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def image_provenance(cfg: ContainerConfig | Mapping[str, Any], *, labels: bool = True,
                     path: str | None = None) -> dict[str, Any]:
    """The image's identity for a run's provenance record.

    Returns {"image", "sha256", "pinned_sha256", "size_bytes", "runtime",
    "runtime_version", "labels"}. The sha256 is cached beside the image (see
    :func:`verify.sha256_cached`). Raises UsageError when the image is missing or
    its sha256 differs from ``container.sha256`` (an unpinned config is recorded,
    not refused). URI images are not hashed: pull them to a file first.
    """
    c = _config(cfg)
    if c.is_uri:
        raise UsageError(f"container.image is a URI ({c.image}): pull it to a .sif on a shared "
                         "path first (scalelab container pull) so every job runs the same bytes")
    p = runtime.check_image_file(c.image)
    digest = verify.sha256_cached(p)
    if c.sha256 and digest != c.sha256:
        raise UsageError(f"sha256 mismatch for {c.image}: pinned {c.sha256}, file has {digest}")
    rt = runtime.detect(c.runtime, path)
    return {
        "image": str(Path(c.image).resolve()),
        "sha256": digest,
        "pinned_sha256": c.sha256,
        "size_bytes": p.stat().st_size,
        "runtime": rt.name if rt else None,
        "runtime_version": runtime.runtime_version(rt) if rt else None,
        "labels": inspect_labels(rt, c.image) if (rt and labels) else {},
    }
