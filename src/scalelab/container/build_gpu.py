"""Build the GPU image on this machine from Debian and PyPI's CUDA wheels (no NVIDIA registry).

Four stages, each an Apptainer definition, each cached under ``~/.cache/scalelab/images/``
by the hash of its inputs (``scalelab container build --gpu``; tools/build_gpu_image.sh):

1. ``containers/cpu/base.def``: the CPU image's debootstrap Debian bookworm base (the same
   cache entry: built once for both images).
2. ``containers/gpu/stack.def`` -> ``gpu-stack-<key>/``: /opt/scalelab/venv with the image's
   part of ``envs/lock-pypi.txt`` (torch 2.13.0 as PyPI serves it: the CUDA 13.0 build, its
   ``nvidia-*`` wheels, one NCCL; nvidia-ml-py; the Open MPI wheel; mpi4py), fetched by the
   host's pip with ``--require-hashes`` for the image's Python (a wheelhouse kept under
   ``~/.cache/scalelab/wheels-gpu/``), RDMA user-space libraries from Debian.
3. ``containers/gpu/horovod.def`` -> ``gpu-horovod-<key>/``: Horovod 0.28.1 with
   ``HOROVOD_GPU_OPERATIONS=NCCL`` against that NCCL, compiled with the CUDA 13.0 build tools
   of ``envs/lock-cuda-build.txt`` (PyPI wheels, removed again); the build log shows the nvcc
   and headers it used (``build-logs/``, and ``/opt/scalelab/build-logs/horovod-build.log``
   in the image).
4. ``containers/gpu/app.def``: scalelab's wheel and the ``.pth`` start-up hook, ``%test``
   (no GPU needed), labels; squashed to ``gpu-horovod-<key>/scalelab-gpu-<src>.sif``.

The cold build needs about 24 GB free (3 GB of wheels, a 6 GB venv three times while the last
stage copies it, the SIF); it is refused with less. Host driver for the result: R580+.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scalelab.container import build, build_plan, runtime
from scalelab.container.build_gpu_plan import (
    CUDA_ARCHS,
    DRIVER_NOTE,
    MIN_FREE_GB,
    GpuPlan,
    check_disk,
    free_gb,
    plan,
)
from scalelab.container.build_stages import (
    STAGE_OK,
    Stages,
    build_lock,
    clean_env,
    keep_result,
    pip_sdist,
    run_logged,
    scalelab_wheel,
)
from scalelab.fsio import atomic_write_text, sha256_file


def wheelhouse_argv(p: GpuPlan, requirements: Path) -> list[str]:
    """The host's pip, reading only PyPI (no local config or find-links), fetching every pin
    with its hash as a wheel for the image's Python and platform."""
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    argv = [
        sys.executable,
        "-m",
        "pip",
        "--isolated",
        "download",
        "--quiet",
        "--progress-bar",
        "off",
        "--dest",
        str(p.wheels),
        "--only-binary=:all:",
        "--python-version",
        build_plan.IMAGE_PYTHON,
        "--implementation",
        "cp",
        "--abi",
        build_plan.IMAGE_PY_TAG,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    if Path(cert).is_file():
        argv += ["--cert", cert]
    for plat in build_plan.image_platforms(p.machine):
        argv += ["--platform", plat]
    return [*argv, "--platform", "any", "--require-hashes", "--no-deps", "-r", str(requirements)]


def _inputs(p: GpuPlan, meta: Path, log: Path, say) -> None:
    """The wheelhouse (kept between builds) and the stage inputs in `meta` (bound on /mnt)."""
    t0 = time.monotonic()
    names = {line.split("==", 1)[0] for line in p.pins}
    everything = [*p.pins, *(t for t in p.tools if t.split("==", 1)[0] not in names)]
    (meta / "lock.txt").write_text("\n".join(everything) + "\n")
    (meta / "requirements.txt").write_text("\n".join(x.split()[0] for x in p.pins) + "\n")
    (meta / "cuda-build.txt").write_text("\n".join(x.split()[0] for x in p.tools) + "\n")
    say(f"wheelhouse: pip download of {len(everything)} hashed pins into {p.wheels} ...")
    argv = wheelhouse_argv(p, meta / "lock.txt")
    run_logged(argv, log, "pip download (the GPU wheelhouse)", env=clean_env())
    envs = p.repo / "envs"
    pip_sdist(envs / "lock-horovod.txt", meta / "horovod-src", log, pypi_only=True)
    shutil.copy2(envs / "patch_horovod.sh", meta / "horovod-src" / "patch_horovod.sh")
    p.times["wheelhouse"] = round(time.monotonic() - t0, 1)


def _stack_and_horovod(p: GpuPlan, st: Stages) -> Path:
    """Stages 2 and 3 (cached together): the CUDA stack, then Horovod compiled on it."""
    gpu_dir = p.repo / "containers" / "gpu"
    stack, hvd = p.stack_dir / "stack", p.hvd_dir / "horovod"
    if (hvd / STAGE_OK).is_file():
        st.say(f"stack, horovod: cached ({hvd})")
        return hvd
    p.stack_dir.mkdir(parents=True, exist_ok=True)
    p.hvd_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=p.images, prefix="gpu-inputs-") as meta_dir:
        meta = Path(meta_dir)
        os.chmod(meta, 0o755)
        _inputs(p, meta, st.log, st.say)
        binds = {p.wheels: "/srv", meta: "/mnt"}
        st.on_top("stack", stack, gpu_dir / "stack.def", {"base": p.base_dir}, binds)
        st.on_top("horovod", hvd, gpu_dir / "horovod.def", {"stack": stack}, binds)
    return hvd


def _app_args(p: GpuPlan, hvd: Path, wheel: Path, commit: str) -> dict[str, object]:
    """The last stage's build arguments: what it installs and the labels it writes."""
    gpu_dir = p.repo / "containers" / "gpu"
    v = p.versions()
    return {
        "horovod_stage": hvd,
        "horovod": v["horovod"],
        "wheel": wheel,
        "hook_module": gpu_dir / "scalelab_image_env.py",
        "hook_pth": gpu_dir / "scalelab-image-env.pth",
        "torch": v["torch"],
        "cuda": v["cuda"],
        "nccl": v["nccl"],
        "openmpi": v["openmpi"],
        "mpi4py": v["mpi4py"],
        "nvcc": v["nvcc"],
        "cuda_archs": CUDA_ARCHS.replace(",", " "),
        "arch": p.machine,
        "version": v["scalelab"],
        "commit": commit,
        "lock_pypi": p.lock_pypi,
        "lock_cuda_build": p.lock_cuda_build,
        "key": f"{p.stack_key}-{p.hvd_key}-{p.src_key}",
    }


def build_gpu(
    repo: Path,
    *,
    commit: str,
    notest: bool = False,
    mksquashfs_args: str = build.MKSQUASHFS_ARGS,
    say=print,
) -> tuple[Path, GpuPlan]:
    """Build (or find cached) the GPU image; returns (cached SIF, plan with stage times)."""
    p = plan(repo)
    say(f"note: {DRIVER_NOTE}")
    p.images.mkdir(parents=True, exist_ok=True)
    log = p.images / f"build-gpu-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    t_all = time.monotonic()
    st = Stages(runtime.require("apptainer"), log, say, p.times)
    with build_lock(p.images / ".build.lock"):
        if p.cached_sif.is_file() and not notest:
            keys = f"stack {p.stack_key}, horovod {p.hvd_key}, scalelab {p.src_key}"
            say(f"image: cached ({p.cached_sif}; {keys})")
            p.times["total"] = round(time.monotonic() - t_all, 1)
            return p.cached_sif, p
        check_disk(p)
        say(
            f"disk: {free_gb(p.images):.1f} GB free under {p.images} (the cold build needs "
            f"about {MIN_FREE_GB} GB); log {log}"
        )
        # The CPU image's base: the same definition and cache entry, built once for both.
        st.base(p.base_dir, repo / "containers" / "cpu" / "base.def", build_plan.debian_mirror())
        hvd = _stack_and_horovod(p, st)
        tmp = p.cached_sif.with_name(p.cached_sif.name + ".tmp")
        with tempfile.TemporaryDirectory(dir=p.images, prefix="dist-") as dist:
            os.chmod(dist, 0o755)
            say("scalelab: wheel + thin last stage, %test, mksquashfs ...")
            wheel = scalelab_wheel(repo, Path(dist), log)
            args = _app_args(p, hvd, wheel, commit)
            definition = repo / "containers" / "gpu" / "app.def"
            st.sif("scalelab", tmp, definition, args, notest=notest,
                   mksquashfs_args=mksquashfs_args)  # fmt: skip
        out = keep_result(tmp, p.cached_sif, notest=notest, stale="scalelab-gpu-*.sif")
        if notest:
            return out, p
        p.times["total"] = round(time.monotonic() - t_all, 1)
        say(f"image: built in {p.times['total']} s ({p.cached_sif}; log {log})")
    return p.cached_sif, p


def publish(cached: Path, image: Path, p: GpuPlan, commit: str) -> dict:
    """Copy the image to its destination (atomically); record sha256, versions and locks."""
    image.parent.mkdir(parents=True, exist_ok=True)
    if image.resolve() != cached.resolve():
        tmp = image.with_name(f".{image.name}.tmp.{os.getpid()}")
        try:  # 3 GB: a hard link where it can be (the cached file is replaced, never edited)
            os.link(cached, tmp)
        except OSError:
            shutil.copyfile(cached, tmp)
        tmp.replace(image)
    digest = sha256_file(image)
    record = {
        "image": str(image.resolve()),
        "sha256": digest,
        "size_bytes": image.stat().st_size,
        "variant": "gpu",
        "machine": p.machine,
        "versions": p.versions(),
        "lock_pypi_sha256": p.lock_pypi,
        "lock_cuda_build_sha256": p.lock_cuda_build,
        "base_key": p.base_key,
        "stack_key": p.stack_key,
        "horovod_key": p.hvd_key,
        "source_key": p.src_key,
        "source_commit": commit,
        "pins": [line.split()[0] for line in p.pins],
        "build_tools": [line.split()[0] for line in p.tools],
        "driver": DRIVER_NOTE,
        "stage_seconds": p.times,
    }
    atomic_write_text(image.with_name(image.name + ".sha256"), f"{digest}  {image.name}\n")
    atomic_write_text(
        image.with_name(image.name + ".build.json"), json.dumps(record, indent=2) + "\n"
    )
    return record
