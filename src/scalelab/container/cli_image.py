"""`scalelab container pull`, `push`, `sign`, `verify`, `inspect` and `exec`: running the runtime
on an image."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from scalelab.container import pull, registry, runtime, verify
from scalelab.container.build import sha256_record
from scalelab.container.config import ContainerConfig, launch_srun
from scalelab.container.wiring import checked_image, exec_prefix, parse_inspect_labels
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text, sha256_file
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
    """Pull, check the sha256 pin, then the signature, then rename into place."""
    cfg = ContainerConfig.from_file(args.config) if args.config else None
    uri = args.uri or (cfg.registry if cfg else None)
    if not uri:
        raise UsageError("give URI or --config with container.registry")
    source = pull.runtime_uri(uri)
    pinned = args.sha256 or (cfg.sha256 if cfg else None)
    if pinned:
        pinned = ContainerConfig.from_mapping(
            {"image": "x", "sha256": pinned}, where="--sha256"
        ).sha256
    default = uri.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1].replace(":", "_")
    default = default if default.endswith(".sif") else default + ".sif"
    image = Path(args.image or (cfg.image if cfg else default)).resolve()
    if not pinned:
        raise UsageError(
            "no pin: give --sha256 (the digest the image's builder recorded in "
            "IMAGE.sha256) or --config with container.sha256"
        )
    keys = verify.trusted_key_files(args.key, "--key") or (cfg.trusted_keys if cfg else [])
    name, rt = _runtime_name(args)
    if args.dry_run or rt is None:
        print(shlex.join(runtime.pull_argv(name, str(pull.temp_name(image)), source, force=True)))
        return 0
    got = pull.pull_verified(rt, uri, image, pinned=pinned, keys=keys, force=args.force)
    signed = f"; signed by {got.signed_by}" if got.signed_by else ""
    print(f"{got.image}: sha256 {got.sha256} matches the pin{signed}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Push, then print the manifest digest the registry holds for what was pushed."""
    rt = runtime.require(args.runtime)
    pushed = registry.push(rt, args.image, args.uri)
    print(
        f"{args.image}: pushed to {pushed.ref}; manifest digest {pushed.manifest_digest}, "
        f"file sha256 {pushed.sha256}"
    )
    print(f"  container.registry: {pushed.pinned_ref}")
    print(f'  container.sha256: "{pushed.sha256}"')
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign with the user's private key; the file's bytes change, so print the new pin."""
    rt = runtime.require(args.runtime)
    image = runtime.check_image_file(args.image)
    key = Path(args.key)
    if not key.is_file():
        raise UsageError(f"--key: {key}: no such file (a PEM private key)")
    argv = runtime.sign_argv(rt.name, str(image), str(key))
    rc = runtime.run([rt.path, *argv[1:]])
    if rc != 0:
        raise UsageError(f"{shlex.join(argv)} failed with exit {rc}")
    digest = sha256_file(image)
    record = sha256_record(image)
    note = ""
    if record.exists():  # a build's record would name the unsigned bytes
        atomic_write_text(record, f"{digest}  {image.name}\n")
        note = f" (rewrote {record.name})"
    print(f"{image}: signed with {key}; its sha256 is now {digest}: pin this one{note}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:

    cfg = ContainerConfig.from_file(args.config) if args.config else None
    image = args.image or (cfg.image if cfg else None)
    if not image:
        raise UsageError("give IMAGE or --config with container.image")
    pinned = args.sha256 or (cfg.sha256 if cfg else None)
    keys = verify.trusted_key_files(args.key, "--key") or (cfg.trusted_keys if cfg else [])
    rt = None if args.signature == "skip" else runtime.require(args.runtime)
    result = verify.verify(image, pinned, rt=rt, signature=args.signature, keys=keys)
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
    cfg = ContainerConfig.from_mapping({**cfg.model_dump(), **changes})  # checked again
    name, rt = _runtime_name(argparse.Namespace(dry_run=args.dry_run, runtime=cfg.runtime))
    if not cfg.is_uri and not args.dry_run:
        runtime.check_image_file(cfg.image)
    # Charliecloud and Podman run a tree derived from the SIF: only from one whose pin (and
    # signature) held, named by its sha256.
    sha256 = checked_image(cfg).sha256 if cfg.runtime in runtime.DERIVED_TREE else None
    argv = exec_prefix(
        cfg, cfg.bind_specs, cfg.env_pairs, sha256=sha256, command=command, derive=not args.dry_run
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
