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

from scalelab.container import build, build_plan, build_stages, runtime
from scalelab.container.build_gpu_plan import (
    CUDA_ARCHS,
    DRIVER_NOTE,
    MIN_FREE_GB,
    GpuPlan,
    check_disk,
    free_gb,
    plan,
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    build_stages._run(
        wheelhouse_argv(p, meta / "lock.txt"), log, "pip download (the GPU wheelhouse)", env=env
    )
    envs = p.repo / "envs"
    build_stages._run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "--dest",
            str(meta / "horovod-src"),
            "-r",
            str(envs / "lock-horovod.txt"),
        ],
        log,
        "pip download (Horovod's sdist)",
        env=env,
    )
    shutil.copy2(envs / "patch_horovod.sh", meta / "horovod-src" / "patch_horovod.sh")
    p.times["wheelhouse"] = round(time.monotonic() - t0, 1)


def build_gpu(
    repo: Path,
    *,
    commit: str,
    notest: bool = False,
    mksquashfs_args: str = build.MKSQUASHFS_ARGS,
    say=print,
) -> tuple[Path, GpuPlan]:
    """Build (or find cached) the GPU image; returns (cached SIF, plan with stage times)."""
    rt = runtime.require("apptainer")
    p = plan(repo)
    say(f"note: {DRIVER_NOTE}")
    images = p.images
    images.mkdir(parents=True, exist_ok=True)
    log = images / f"build-gpu-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    t_all = time.monotonic()
    with build_stages._lock(images / ".build.lock"):
        if p.cached_sif.is_file() and not notest:
            say(
                f"image: cached ({p.cached_sif}; stack {p.stack_key}, horovod {p.hvd_key}, "
                f"scalelab {p.src_key})"
            )
            p.times["total"] = round(time.monotonic() - t_all, 1)
            return p.cached_sif, p
        check_disk(p)
        say(
            f"disk: {free_gb(images):.1f} GB free under {images} (the cold build needs about "
            f"{MIN_FREE_GB} GB); log {log}"
        )
        mirror = build_plan.debian_mirror()
        base_def = repo / "containers" / "cpu" / "base.def"
        root_build = [rt.path, "build"] if os.geteuid() == 0 else [rt.path, "build", "--fakeroot"]
        bp = build_plan.Plan(
            repo=repo,
            cpu_dir=base_def.parent,
            pins=[],
            torch_index=None,
            horovod=None,
            base_key=p.base_key,
            deps_key="",
            src_key="",
        )
        build_stages._stage(
            bp,
            "base",
            p.base_dir,
            lambda out: [
                *root_build,
                "--sandbox",
                "--build-arg",
                f"mirror={mirror}",
                str(out),
                str(base_def),
            ],
            log,
            say,
        )
        p.times.update(bp.times)
        gpu_dir = repo / "containers" / "gpu"
        stack, hvd = p.stack_dir / "stack", p.hvd_dir / "horovod"
        need_inputs = not (hvd / ".scalelab-stage-ok").is_file()
        with tempfile.TemporaryDirectory(dir=images, prefix="gpu-inputs-") as meta_dir:
            meta = Path(meta_dir)
            os.chmod(meta, 0o755)
            if need_inputs:
                _inputs(p, meta, log, say)
            binds = ["--bind", f"{p.wheels}:/srv:ro", "--bind", f"{meta}:/mnt:ro"]
            p.stack_dir.mkdir(parents=True, exist_ok=True)
            p.hvd_dir.mkdir(parents=True, exist_ok=True)
            if need_inputs:
                sp = build_plan.Plan(
                    repo=repo,
                    cpu_dir=gpu_dir,
                    pins=[],
                    torch_index=None,
                    horovod=None,
                    base_key="",
                    deps_key="",
                    src_key="",
                )
                build_stages._stage(
                    sp,
                    "stack",
                    stack,
                    lambda out: [
                        *build_stages._staged(rt),
                        "--sandbox",
                        *binds,
                        "--build-arg",
                        f"base={p.base_dir}",
                        str(out),
                        str(gpu_dir / "stack.def"),
                    ],
                    log,
                    say,
                )
                build_stages._stage(
                    sp,
                    "horovod",
                    hvd,
                    lambda out: [
                        *build_stages._staged(rt),
                        "--sandbox",
                        *binds,
                        "--build-arg",
                        f"stack={stack}",
                        str(out),
                        str(gpu_dir / "horovod.def"),
                    ],
                    log,
                    say,
                )
                p.times.update(sp.times)
            else:
                say(f"stack, horovod: cached ({hvd})")
        with tempfile.TemporaryDirectory(dir=images, prefix="dist-") as dist:
            os.chmod(dist, 0o755)
            t0 = time.monotonic()
            say("scalelab: wheel + thin last stage, %test, mksquashfs ...")
            wheel = build._scalelab_wheel(
                build_plan.Plan(
                    repo=repo,
                    cpu_dir=gpu_dir,
                    pins=[],
                    torch_index=None,
                    horovod=None,
                    base_key="",
                    deps_key="",
                    src_key="",
                ),
                Path(dist),
                log,
            )
            v = p.versions()
            args = {
                "horovod_stage": str(hvd),
                "horovod": v["horovod"],
                "wheel": str(wheel),
                "hook_module": str(gpu_dir / "scalelab_image_env.py"),
                "hook_pth": str(gpu_dir / "scalelab-image-env.pth"),
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
            tmp = p.cached_sif.with_name(p.cached_sif.name + ".tmp")
            argv = [
                *build_stages._staged(rt),
                "--force",
                *(["--notest"] if notest else []),
                "--mksquashfs-args",
                mksquashfs_args,
            ]
            for k, val in args.items():
                argv += ["--build-arg", f"{k}={val}"]
            build_stages._run(
                [*argv, str(tmp), str(gpu_dir / "app.def")],
                log,
                "stage scalelab (GPU)",
                env=build_stages._clean_env(),
            )
            p.times["scalelab"] = round(time.monotonic() - t0, 1)
        if notest:
            out = p.cached_sif.with_name(p.cached_sif.stem + "-notest.sif")
            tmp.rename(out)
            return out, p
        tmp.rename(p.cached_sif)
        for old in p.hvd_dir.glob("scalelab-gpu-*.sif"):
            if old != p.cached_sif:
                old.unlink(missing_ok=True)
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
