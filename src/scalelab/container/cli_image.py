"""`scalelab container pull`, `verify`, `inspect` and `exec`: running the runtime on an image."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from scalelab.container import runtime, verify
from scalelab.container.config import ContainerConfig, launch_srun
from scalelab.container.wiring import exec_flags, parse_inspect_labels
from scalelab.errors import CheckFailed, UsageError
from scalelab.fsio import sha256_file
from scalelab.launch import commands


def _runtime_name(args: argparse.Namespace):
    """(name for the command line, Runtime or None); a dry run needs no installed runtime."""

    if args.dry_run:
        rt = runtime.detect(args.runtime)
        return (rt.name if rt else ("apptainer" if args.runtime == "auto" else args.runtime)), rt
    rt = runtime.require(args.runtime)
    return rt.name, rt


def _run_or_print(args: argparse.Namespace, argv: list[str], rt, cwd: Path | None = None) -> int:

    if args.dry_run or rt is None:
        print(shlex.join(argv))
        return 0
    full = [rt.path, *argv[1:]] if argv[0] == rt.name else argv
    return runtime.run(full, cwd=cwd)


def cmd_pull(args: argparse.Namespace) -> int:
    import os

    if "://" not in args.uri:
        raise UsageError(
            f"{args.uri} is not a URI (https://, oras://, docker://, library://); "
            "for an image on a shared path, point container.image at the file"
        )
    cfg = ContainerConfig.from_file(args.config) if args.config else None
    pinned = args.sha256 or (cfg.sha256 if cfg else None)
    if pinned:
        pinned = ContainerConfig.from_mapping(
            {"image": "x", "sha256": pinned}, where="--sha256"
        ).sha256
    default = args.uri.rstrip("/").rsplit("/", 1)[-1].replace(":", "_")
    default = default if default.endswith(".sif") else default + ".sif"
    image = Path(args.image or (cfg.image if cfg else default)).resolve()
    if not pinned:
        raise UsageError(
            "no pin: give --sha256 (the digest the image's builder recorded in "
            "IMAGE.sha256) or --config with container.sha256"
        )
    name, rt = _runtime_name(args)
    tmp = image.with_name(f".{image.name}.pull.{os.getpid()}")
    argv = runtime.pull_argv(name, str(tmp), args.uri, force=True)
    if args.dry_run or rt is None:
        print(shlex.join(argv))
        return 0
    if image.exists() and not args.force and sha256_file(image) != pinned:
        raise UsageError(
            f"{image} exists and holds a different image than sha256 {pinned}: "
            "refusing to replace it (pass --force, or choose another --image)"
        )
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        rc = runtime.run([rt.path, *argv[1:]])
        if rc != 0:
            raise UsageError(f"{shlex.join(argv)} failed with exit {rc}")
        got = sha256_file(tmp)
        if got != pinned:
            raise CheckFailed(
                f"{args.uri}: pulled image has sha256 {got}, pinned {pinned}: "
                f"refused ({image} left as it was)"
            )
        tmp.replace(image)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{image}: sha256 {pinned} matches the pin")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:

    cfg = ContainerConfig.from_file(args.config) if args.config else None
    image = args.image or (cfg.image if cfg else None)
    if not image:
        raise UsageError("give IMAGE or --config with container.image")
    pinned = args.sha256 or (cfg.sha256 if cfg else None)
    rt = None if args.signature == "skip" else runtime.require(args.runtime)
    result = verify.verify(image, pinned, rt=rt, signature=args.signature)
    if args.json:
        print(json.dumps({"ok": True, **dataclasses.asdict(result)}))
    else:
        print(
            f"{result.image}: sha256 {result.sha256} matches the pin; signature {result.signature}"
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:

    rt = runtime.require(args.runtime)
    runtime.check_image_file(args.image)
    argv = runtime.inspect_argv(rt.name, args.image)
    proc = subprocess.run([rt.path, *argv[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise UsageError(f"{shlex.join(argv)} failed: {last[-1] if last else proc.returncode}")
    if args.json:
        sys.stdout.write(proc.stdout)
        return 0
    labels = parse_inspect_labels(proc.stdout)
    if not labels:
        raise UsageError(f"{args.image}: no labels in `{shlex.join(argv)}` output")
    width = max(len(k) for k in labels)
    for key in sorted(labels):
        print(f"{key:<{width}}  {labels[key]}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    import shutil

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("give the command after --, e.g. -- scalelab train --config run.yaml")
    if args.config:
        cfg = ContainerConfig.from_file(args.config)
    elif args.image:
        cfg = ContainerConfig.from_mapping({"image": args.image})
    else:
        raise UsageError("give --image or --config with container.image")
    mpi, srun_flags = launch_srun(args.config) if args.config else ("pmix", ())
    changes: dict = {"binds": [*cfg.binds, *args.bind]}
    if args.image:
        changes["image"] = args.image
    if args.no_nv:
        changes["nv"] = False
    if args.srun_mpi:
        mpi = args.srun_mpi
    if args.userns:
        changes["userns"] = args.userns
    if args.runtime != "auto":
        changes["runtime"] = args.runtime
    cfg = cfg.model_copy(update=changes)
    name, rt = _runtime_name(argparse.Namespace(dry_run=args.dry_run, runtime=cfg.runtime))
    if not cfg.is_uri and not args.dry_run:
        runtime.check_image_file(cfg.image)
    argv = runtime.exec_argv(
        name,
        cfg.image,
        command,
        nv=cfg.nv,
        binds=cfg.bind_specs,
        env=cfg.env_pairs,
        flags=exec_flags(cfg),
    )
    if not args.srun:
        return _run_or_print(args, argv, rt)
    if args.nodes < 1 or args.ntasks_per_node < 1:
        raise UsageError(
            f"nodes and tasks_per_node must be >= 1, got {args.nodes} and {args.ntasks_per_node}"
        )
    argv = commands.compose(
        commands.srun(
            mpi=mpi,
            nodes=args.nodes,
            ntasks=args.nodes * args.ntasks_per_node,
            tasks_per_node=args.ntasks_per_node,
            kill_on_bad_exit=False,
            flags=list(srun_flags),
            locate=False,
            per_node_first=True,
        ),
        argv,
    )
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]} not found on PATH (--srun runs inside a Slurm allocation)")
    return runtime.run(argv)
