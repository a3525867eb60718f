"""`scalelab container build`: the staged CPU or GPU image, or apptainer build of a definition."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from scalelab.container import build, build_gpu, build_gpu_plan, build_plan, runtime
from scalelab.container.cli_image import _run_or_print, _runtime_name
from scalelab.container.cli_recipe import _containers_dir
from scalelab.errors import UsageError


def _git_commit(root: Path) -> str:
    """HEAD, with -dirty when tracked files differ (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def cmd_build(args: argparse.Namespace) -> int:

    root = _containers_dir().parent
    if args.gpu:
        if args.definition or args.torch_index:
            raise UsageError("--gpu builds containers/gpu/: it takes no --def or --torch-index")
        return _build_gpu(args, root)
    if args.definition is None:
        return _build_cpu(args, root)
    definition = Path(args.definition)
    if not definition.is_absolute():
        here = Path.cwd() / definition
        definition = here if here.exists() else root / definition
    if not definition.is_file():
        raise UsageError(f"definition file not found: {args.definition}")
    image = Path(args.image or definition.with_suffix(".sif").name).resolve()
    if image.exists() and not args.force:
        raise UsageError(f"{image} exists: pass --force to overwrite it")
    name, rt = _runtime_name(args)
    commit = args.commit or _git_commit(root)
    argv = runtime.build_argv(
        name,
        str(image),
        str(definition),
        fakeroot=not args.no_fakeroot,
        build_args={"SOURCE_COMMIT": commit},
        force=args.force,
        notest=args.notest,
    )
    # %files paths in the definitions are relative to the repository root.
    return _run_or_print(args, argv, rt, cwd=root)


def _build_cpu(args: argparse.Namespace, root: Path) -> int:
    """The staged CPU build of containers/cpu/ (see scalelab.container.build)."""

    image = Path(args.image or "scalelab-cpu.sif").resolve()
    if image.exists() and not args.force:
        raise UsageError(f"{image} exists: pass --force to overwrite it")
    commit = args.commit or _git_commit(root)
    if args.dry_run:
        p = build_plan.plan(root, args.torch_index)
        print(
            f"would build {image}: base {p.base_key}, deps {p.deps_key} "
            f"({'cached' if (p.deps_dir / 'deps').is_dir() else 'to build'}), "
            f"scalelab {p.src_key}"
        )
        return 0
    cached, p = build.build_cpu(
        root,
        commit=commit,
        torch_index=args.torch_index,
        notest=args.notest,
        mksquashfs_args=args.mksquashfs_args or build.MKSQUASHFS_ARGS,
        say=lambda m: print(f"scalelab container build: {m}", flush=True),
    )
    record = build.publish(cached, image, p, commit)
    print(
        f"{image}: sha256 {record['sha256']} (recorded in {image.name}.sha256 and "
        f"{image.name}.build.json)"
    )
    return 0


def _build_gpu(args: argparse.Namespace, root: Path) -> int:
    """The staged GPU build of containers/gpu/ (see scalelab.container.build_gpu)."""
    image = Path(args.image or "scalelab-gpu.sif").resolve()
    if image.exists() and not args.force:
        raise UsageError(f"{image} exists: pass --force to overwrite it")
    commit = args.commit or _git_commit(root)
    p = build_gpu_plan.plan(root)
    if args.dry_run:
        print(
            f"would build {image}: base {p.base_key}, stack {p.stack_key}, horovod "
            f"{p.hvd_key} ({'cached' if (p.hvd_dir / 'horovod').is_dir() else 'to build'}), "
            f"scalelab {p.src_key}; {', '.join(f'{k} {v}' for k, v in p.versions().items())}"
        )
        print(f"note: {build_gpu_plan.DRIVER_NOTE}")
        return 0
    cached, p = build_gpu.build_gpu(
        root,
        commit=commit,
        notest=args.notest,
        mksquashfs_args=args.mksquashfs_args or build.MKSQUASHFS_ARGS,
        say=lambda m: print(f"scalelab container build: {m}", flush=True),
    )
    record = build_gpu.publish(cached, image, p, commit)
    print(
        f"{image}: sha256 {record['sha256']} (recorded in {image.name}.sha256 and "
        f"{image.name}.build.json)"
    )
    return 0
