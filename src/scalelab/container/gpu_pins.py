"""The GPU image's pins, read from the hashed locks (no network, no build).

The GPU image (``scalelab container build --gpu``) installs the image's part of
``envs/lock-pypi.txt`` (torch 2.13.0 as PyPI serves it: the CUDA 13.0 build with its
``nvidia-*`` wheels, one NCCL, nvidia-ml-py, the Open MPI wheel, mpi4py) and builds Horovod
with the CUDA tools of ``envs/lock-cuda-build.txt``. lock-pypi.txt is a universal lock: a
package may appear twice under environment markers (``contourpy==1.3.3 ; python_full_version
< '3.12'``); here the markers are evaluated for the image (CPython 3.11, Linux, its machine).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from scalelab.errors import UsageError

#: The image's interpreter environment for marker evaluation (Debian bookworm's python3).
IMAGE_MARKER_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
#: Host-only tools (workflow driver, linters, lock tools): never in an image.
HOST_ONLY = frozenset(
    {
        "snakemake",
        "snakemake-executor-plugin-slurm",
        "snakefmt",
        "spython",
        "hpccm",
        "pytest",
        "pytest-timeout",
        "ruff",
        "uv",
        "hypothesis",
        "black",
        "import-linter",
        "grimp",
    }
)


def _entries(text: str, machine: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (name==version, hashes, via) of the entries whose marker holds in the image."""
    from packaging.markers import Marker

    env = {**IMAGE_MARKER_ENV, "platform_machine": machine}
    out: dict[str, tuple[str, list[str], list[str]]] = {}
    current: tuple[str, list[str], list[str]] | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            spec, _, marker = line.rstrip("\\").strip().partition(";")
            spec = spec.strip()
            if marker.strip() and not Marker(marker.strip()).evaluate(env):
                current = None
                continue
            current = (spec, [], [])
            name = spec.split("==", 1)[0].lower()
            if name in out:
                raise UsageError(f"lock: two entries of {name} hold for the image")
            out[name] = current
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash="):
            current[1].append(line.rstrip("\\").strip())
        elif line.startswith("# via"):
            rest = line[len("# via") :].strip()
            current[2].extend([rest] if rest else [])
            in_via = not rest
        elif in_via and line.startswith("#   "):
            current[2].append(line[4:].strip())
        else:
            in_via = False
    return out


def image_pins(lock: Path, machine: str = "x86_64") -> list[str]:
    """The image's part of a hashed lock: its direct requirements minus the host-only tools,
    and what they need (the lock's `via` lines), each `name==version --hash=...`."""
    if not lock.is_file():
        raise UsageError(f"{lock}: missing (the GPU image's lock)")
    entries = _entries(lock.read_text(), machine)
    if "torch" not in entries:
        raise UsageError(f"{lock}: no torch entry")
    kept = {
        n
        for n, (_, _, via) in entries.items()
        if n not in HOST_ONLY and any(v.startswith("-r ") for v in via)
    }
    grew = True
    while grew:
        grew = False
        for name, (_, _, via) in entries.items():
            if name not in kept and name not in HOST_ONLY and any(v.lower() in kept for v in via):
                kept.add(name)
                grew = True
    return [" ".join([entries[n][0], *entries[n][1]]) for n in sorted(kept)]


def build_tool_pins(lock: Path, machine: str = "x86_64") -> list[str]:
    """Every entry of envs/lock-cuda-build.txt (all are build tools)."""
    if not lock.is_file():
        raise UsageError(f"{lock}: missing (the CUDA build tools' lock)")
    entries = _entries(lock.read_text(), machine)
    if "nvidia-cuda-nvcc" not in entries:
        raise UsageError(f"{lock}: no nvidia-cuda-nvcc entry")
    return [" ".join([spec, *hashes]) for spec, hashes, _ in entries.values()]


def version_of(pins: Sequence[str], name: str) -> str:
    """The version of `name` in the pins (2.13.0), UsageError when it is not pinned."""
    for p in pins:
        m = re.match(rf"^{re.escape(name)}==(\S+)", p, re.IGNORECASE)
        if m:
            return m.group(1).split("+")[0]
    raise UsageError(f"the GPU image's pins have no {name}==")
