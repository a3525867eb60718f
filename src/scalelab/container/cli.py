"""`scalelab container ...`: generate, lint, lock, build, pull, verify, inspect, exec.

Commands that run the container runtime (build, pull, verify with signatures,
inspect, exec) stop with one error line when neither apptainer nor singularity
is installed; ``--dry-run`` prints the exact command line instead of running it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from scalelab.errors import CheckFailed, UsageError

#: User arguments of containers/recipe.py (the GPU image; see its docstring).
RECIPE_OPTIONS = ("cuda", "distro", "arch", "python", "torch", "torch_index", "nccl", "openmpi",
                  "ucx", "mpi4py", "horovod", "cuda_archs", "srun_mpi", "lock", "requirements")


def register(subparsers: argparse._SubParsersAction) -> None:
    """`scalelab container ACTION`: one function per action below."""
    p = subparsers.add_parser("container", help="Apptainer images: generate, lint, lock, build, "
                              "pull, verify, inspect, exec",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="container_command", metavar="ACTION", required=True)
    for add in (_add_generate, _add_lint, _add_lock, _add_build, _add_pull, _add_verify,
                _add_inspect, _add_exec):
        add(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="render the GPU .def from containers/recipe.py (hpccm)")
    g.add_argument("--recipe", help="hpccm recipe (default: containers/recipe.py)")
    g.add_argument("--out", help="write one definition here ('-': stdout); default: rewrite the "
                   "committed scalelab-gpu.def (the CPU image is containers/cpu/, not generated)")
    g.add_argument("--check", action="store_true",
                   help="compare the committed files with the recipe's output; exit 1 if stale")
    for opt in RECIPE_OPTIONS:
        g.add_argument(f"--{opt.replace('_', '-')}", dest=opt, metavar="VALUE",
                       help=f"recipe argument {opt} ('none' turns a component off)")
    g.add_argument("--allow-unpinned", action="store_true",
                   help="render a base that has no digest in the lock (lint will fail it)")
    g.set_defaults(func=cmd_generate)


def _add_lint(sub: argparse._SubParsersAction) -> None:
    li = sub.add_parser("lint", help="check .def files: pinned bases, sections, versioned labels")
    li.add_argument("files", nargs="*", help="definition files (default: containers/*.def)")
    li.set_defaults(func=cmd_lint)


def _add_lock(sub: argparse._SubParsersAction) -> None:
    lk = sub.add_parser("lock", help="resolve base-image digests from the registry into the lock")
    lk.add_argument("--lock", help="lock file (default: containers/lock.yaml)")
    lk.add_argument("--add", action="append", default=[], metavar="REF",
                    help="add an image (registry/name:tag) to the lock")
    lk.add_argument("--only", action="append", default=[], metavar="REF",
                    help="resolve only this image (repeatable)")
    lk.set_defaults(func=cmd_lock)


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build the CPU image here (staged, cached), or any "
                       "definition with apptainer build [--fakeroot]",
                       description="Without --def: the CPU image of containers/cpu/ in three "
                       "stages (debootstrap bookworm base, the pinned stack cached by the hash "
                       "of its inputs under ~/.cache/scalelab/images/, scalelab as a thin last "
                       "stage with %test); its sha256 is written to IMAGE.sha256 and "
                       "IMAGE.build.json. With --def FILE: apptainer build [--fakeroot] IMAGE "
                       "FILE, e.g. the GPU image on a machine that reaches its base registry.")
    b.add_argument("--def", dest="definition",
                   help="definition file (e.g. containers/scalelab-gpu.def); default: the "
                   "staged CPU image of containers/cpu/")
    b.add_argument("--image", help="output .sif (default: <def name>.sif, or scalelab-cpu.sif, "
                   "in the current directory)")
    b.add_argument("--no-fakeroot", action="store_true", help="build as root instead (sudo)")
    b.add_argument("--force", action="store_true", help="overwrite an existing image")
    b.add_argument("--notest", action="store_true", help="skip the %%test section")
    b.add_argument("--commit", help="source commit label (default: git rev-parse HEAD, -dirty "
                   "when tracked files changed)")
    b.add_argument("--mksquashfs-args", metavar="ARGS",
                   help="CPU image: compression of the SIF (default: '-comp zstd "
                   "-Xcompression-level 3'; --mksquashfs-args='-comp gzip' for runtimes "
                   "without zstd)")
    b.add_argument("--torch-index", metavar="URL",
                   help="CPU image: take torch from this pip index (e.g. PyTorch's CPU index) "
                   "instead of what this machine's pip finds (the tested path uses the local "
                   "file pip's find-links holds)")
    _runtime_args(b)
    b.set_defaults(func=cmd_build)


def _add_pull(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("pull", help="apptainer pull an image (http(s)://, oras://, docker://, "
                        "library://) and check its sha256 before anything uses it",
                        description="Pulls into a temporary file beside IMAGE, hashes it, and "
                        "moves it into place only when the sha256 equals the pin; an existing "
                        "IMAGE with other bytes is refused unless --force.")
    pl.add_argument("uri")
    pl.add_argument("--image", help="output .sif (default: the URI's last path part + .sif)")
    pl.add_argument("--sha256", help="pinned sha256 the pulled bytes must have")
    pl.add_argument("--config", help="workflow config: take the pin (and --image) from its "
                    "container: section")
    pl.add_argument("--force", action="store_true",
                    help="replace an existing IMAGE that holds a different (pinned) image")
    _runtime_args(pl)
    pl.set_defaults(func=cmd_pull)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="check the image's sha256 against the pin (and signatures)")
    v.add_argument("image", nargs="?", help="image file (default: container.image of --config)")
    v.add_argument("--sha256", help="pinned sha256 (default: container.sha256 of --config)")
    v.add_argument("--config", help="workflow config with a container: section")
    v.add_argument("--signature", choices=("auto", "require", "skip"), default="auto",
                   help="auto: check signatures when the image has any (default); "
                   "skip: sha256 only, needs no apptainer")
    v.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    v.add_argument("--json", action="store_true",
                   help="print the verdict as one JSON document on stdout")
    v.set_defaults(func=cmd_verify)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show the image's labels (versions, commit, bases)")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print apptainer's JSON as is")
    i.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    i.set_defaults(func=cmd_inspect)


def _add_exec(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("exec", help="run a command in the image (optionally under srun)",
                       description="apptainer exec [--nv] [--bind ...] IMAGE CMD...; with --srun: "
                       "srun --mpi=pmix ... apptainer exec ... (the container call inside srun).")
    e.add_argument("--config", help="workflow config with a container: section")
    e.add_argument("--image", help="image (overrides container.image)")
    e.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:OPTS]]")
    e.add_argument("--no-nv", action="store_true", help="do not pass --nv (CPU image)")
    e.add_argument("--srun", action="store_true", help="wrap in srun (the hybrid MPI model)")
    e.add_argument("--nodes", type=int, default=1)
    e.add_argument("--ntasks-per-node", type=int, default=1)
    e.add_argument("--srun-mpi", help="srun --mpi plugin (default: container.srun_mpi or pmix)")
    e.add_argument("--userns", choices=("auto", "true", "false"),
                   help="pass --userns to apptainer exec (default: container.userns or auto: "
                   "where root lacks capabilities)")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the command to run in the image")
    _runtime_args(e)
    e.set_defaults(func=cmd_exec)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the command line, run nothing")


def _containers_dir() -> Path:
    from scalelab.container.generate import find_containers_dir

    return find_containers_dir()


def _runtime_name(args: argparse.Namespace):
    """(name for the command line, Runtime or None); a dry run needs no installed runtime."""
    from scalelab.container import runtime

    if args.dry_run:
        rt = runtime.detect(args.runtime)
        return (rt.name if rt else ("apptainer" if args.runtime == "auto" else args.runtime)), rt
    rt = runtime.require(args.runtime)
    return rt.name, rt


def _run_or_print(args: argparse.Namespace, argv: list[str], rt, cwd: Path | None = None) -> int:
    from scalelab.container import runtime

    if args.dry_run or rt is None:
        print(shlex.join(argv))
        return 0
    full = [rt.path, *argv[1:]] if argv[0] == rt.name else argv
    return runtime.run(full, cwd=cwd)


# ---- commands -----------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from scalelab.container import generate

    userarg = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k) is not None}
    if args.allow_unpinned:
        userarg["allow_unpinned"] = "1"
    recipe = Path(args.recipe) if args.recipe else _containers_dir() / "recipe.py"
    if args.out:
        text = generate.render(recipe, userarg)
        if args.out == "-":
            sys.stdout.write(text)
        else:
            from scalelab.fsio import guard

            with guard(args.out, "definition", is_ours=generate.is_generated) as out:
                generate.write_atomic(out, generate.stamped(text))
            print(f"wrote {args.out}")
        return 0
    if userarg:
        raise UsageError("recipe options change the output: give --out FILE (or --out -)")
    stale = generate.generate_defaults(recipe.parent, check=args.check)
    if args.check:
        for name in stale:
            print(f"{recipe.parent / name}: differs from the recipe's output "
                  "(run: scalelab container generate)", file=sys.stderr)
        return 1 if stale else 0
    for name in generate.DEFAULT_IMAGES:
        print(f"{'wrote' if name in stale else 'unchanged'} {recipe.parent / name}")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from scalelab.container.lint import lint_file

    files = args.files or sorted(str(p) for p in _containers_dir().glob("*.def"))
    if not files:
        raise UsageError("no .def files to lint")
    bad = 0
    for f in files:
        for v in lint_file(f):
            print(v.format(f))
            bad += 1
    if bad:  # a failed check: the convention's one error line, exit 1
        raise CheckFailed(f"lint: {len(files)} file(s), {bad} problem(s) (listed above)")
    print(f"{len(files)} file(s), 0 problem(s)", file=sys.stderr)
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from scalelab.container import lock

    path = Path(args.lock) if args.lock else _containers_dir() / "lock.yaml"
    for ref, old, new in lock.refresh(path, add=args.add, only=args.only):
        state = "unchanged" if old == new else f"was {old}"
        print(f"{ref} {new} ({state})")
    print(f"wrote {path}")
    return 0


def _git_commit(root: Path) -> str:
    """HEAD, with -dirty when tracked files differ (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def cmd_build(args: argparse.Namespace) -> int:
    from scalelab.container import runtime

    root = _containers_dir().parent
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
    argv = runtime.build_argv(name, str(image), str(definition), fakeroot=not args.no_fakeroot,
                              build_args={"SOURCE_COMMIT": commit}, force=args.force,
                              notest=args.notest)
    # %files paths in the definitions are relative to the repository root.
    return _run_or_print(args, argv, rt, cwd=root)


def _build_cpu(args: argparse.Namespace, root: Path) -> int:
    """The staged CPU build of containers/cpu/ (see scalelab.container.build)."""
    from scalelab.container import build

    image = Path(args.image or "scalelab-cpu.sif").resolve()
    if image.exists() and not args.force:
        raise UsageError(f"{image} exists: pass --force to overwrite it")
    commit = args.commit or _git_commit(root)
    if args.dry_run:
        p = build.plan(root, args.torch_index)
        print(f"would build {image}: base {p.base_key}, deps {p.deps_key} "
              f"({'cached' if (p.deps_dir / 'deps').is_dir() else 'to build'}), "
              f"scalelab {p.src_key}")
        return 0
    cached, p = build.build_cpu(root, commit=commit, torch_index=args.torch_index,
                                notest=args.notest,
                                mksquashfs_args=args.mksquashfs_args or build.MKSQUASHFS_ARGS,
                                say=lambda m: print(f"scalelab container build: {m}", flush=True))
    record = build.publish(cached, image, p, commit)
    print(f"{image}: sha256 {record['sha256']} (recorded in {image.name}.sha256 and "
          f"{image.name}.build.json)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    import os

    from scalelab.container import runtime
    from scalelab.container.config import ContainerConfig
    from scalelab.provenance import sha256_file

    if "://" not in args.uri:
        raise UsageError(f"{args.uri} is not a URI (https://, oras://, docker://, library://); "
                         "for an image on a shared path, point container.image at the file")
    cfg = ContainerConfig.from_file(args.config) if args.config else None
    pinned = args.sha256 or (cfg.sha256 if cfg else None)
    if pinned:
        pinned = ContainerConfig.from_mapping({"image": "x", "sha256": pinned},
                                              where="--sha256").sha256
    default = args.uri.rstrip("/").rsplit("/", 1)[-1].replace(":", "_")
    default = default if default.endswith(".sif") else default + ".sif"
    image = Path(args.image or (cfg.image if cfg else default)).resolve()
    if not pinned:
        raise UsageError("no pin: give --sha256 (the digest the image's builder recorded in "
                         "IMAGE.sha256) or --config with container.sha256")
    name, rt = _runtime_name(args)
    tmp = image.with_name(f".{image.name}.pull.{os.getpid()}")
    argv = runtime.pull_argv(name, str(tmp), args.uri, force=True)
    if args.dry_run or rt is None:
        print(shlex.join(argv))
        return 0
    if image.exists() and not args.force and sha256_file(image) != pinned:
        raise UsageError(f"{image} exists and holds a different image than sha256 {pinned}: "
                         "refusing to replace it (pass --force, or choose another --image)")
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        rc = runtime.run([rt.path, *argv[1:]])
        if rc != 0:
            raise UsageError(f"{shlex.join(argv)} failed with exit {rc}")
        got = sha256_file(tmp)
        if got != pinned:
            raise CheckFailed(f"{args.uri}: pulled image has sha256 {got}, pinned {pinned}: "
                             f"refused ({image} left as it was)")
        tmp.replace(image)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{image}: sha256 {pinned} matches the pin")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from scalelab.container import runtime, verify
    from scalelab.container.config import ContainerConfig

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
        print(f"{result.image}: sha256 {result.sha256} matches the pin; "
              f"signature {result.signature}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from scalelab.container import runtime
    from scalelab.container.wiring import parse_inspect_labels

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

    from scalelab.container import runtime
    from scalelab.container.config import ContainerConfig
    from scalelab.container.wiring import exec_flags

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("give the command after --, e.g. -- scalelab train --config run.yaml")
    if args.config:
        cfg = ContainerConfig.from_file(args.config)
    elif args.image:
        cfg = ContainerConfig.from_mapping({"image": args.image})
    else:
        raise UsageError("give --image or --config with container.image")
    changes: dict = {"binds": (*cfg.binds, *args.bind)}
    if args.image:
        changes["image"] = args.image
    if args.no_nv:
        changes["nv"] = False
    if args.srun_mpi:
        changes["srun_mpi"] = args.srun_mpi
    if args.userns:
        changes["userns"] = args.userns
    if args.runtime != "auto":
        changes["runtime"] = args.runtime
    cfg = dataclasses.replace(cfg, **changes)
    name, rt = _runtime_name(argparse.Namespace(dry_run=args.dry_run, runtime=cfg.runtime))
    if not cfg.is_uri and not args.dry_run:
        runtime.check_image_file(cfg.image)
    argv = runtime.exec_argv(name, cfg.image, command, nv=cfg.nv, binds=cfg.binds, env=cfg.env,
                             flags=exec_flags(cfg))
    if not args.srun:
        return _run_or_print(args, argv, rt)
    argv = [*runtime.srun_argv(nodes=args.nodes, tasks_per_node=args.ntasks_per_node,
                               mpi=cfg.srun_mpi, flags=cfg.srun_flags), *argv]
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    if shutil.which("srun") is None:
        raise UsageError("srun not found on PATH (--srun runs inside a Slurm allocation)")
    return runtime.run(argv)
