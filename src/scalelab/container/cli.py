"""`scalelab container ...`: generate, lint, lock, build, sign, push, pull, verify, inspect, exec.

Commands that run the container runtime (build, pull, verify with signatures,
inspect, exec) stop with one error line when neither apptainer nor singularity
is installed; ``--dry-run`` prints the exact command line instead of running it.
"""

from __future__ import annotations

import argparse

from scalelab.container import runtime
from scalelab.container.cli_build import cmd_build
from scalelab.container.cli_image import (
    cmd_exec,
    cmd_inspect,
    cmd_pull,
    cmd_push,
    cmd_sign,
    cmd_verify,
)
from scalelab.container.cli_recipe import RECIPE_OPTIONS, cmd_generate, cmd_lint, cmd_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    """`scalelab container ACTION`: one function per action below."""
    p = subparsers.add_parser(
        "container",
        help="Apptainer images: generate, lint, lock, build, sign, push, pull, verify, "
        "inspect, exec",
        description=__doc__.splitlines()[0],
    )
    sub = p.add_subparsers(dest="container_command", metavar="ACTION", required=True)
    for add in (
        _add_generate,
        _add_lint,
        _add_lock,
        _add_build,
        _add_sign,
        _add_push,
        _add_pull,
        _add_verify,
        _add_inspect,
        _add_exec,
    ):
        add(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="render the GPU .def from containers/recipe.py (hpccm)")
    g.add_argument("--recipe", help="hpccm recipe (default: containers/recipe.py)")
    g.add_argument(
        "--out",
        help="write one definition here ('-': stdout); default: rewrite the "
        "committed scalelab-gpu.def (the CPU image is containers/cpu/, not generated)",
    )
    g.add_argument(
        "--check",
        action="store_true",
        help="compare the committed files with the recipe's output; exit 1 if stale",
    )
    for opt in RECIPE_OPTIONS:
        g.add_argument(
            f"--{opt.replace('_', '-')}",
            dest=opt,
            metavar="VALUE",
            help=f"recipe argument {opt} ('none' turns a component off)",
        )
    g.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="render a base that has no digest in the lock (lint will fail it)",
    )
    g.set_defaults(func=cmd_generate)


def _add_lint(sub: argparse._SubParsersAction) -> None:
    li = sub.add_parser("lint", help="check .def files: pinned bases, sections, versioned labels")
    li.add_argument("files", nargs="*", help="definition files (default: containers/*.def)")
    li.set_defaults(func=cmd_lint)


def _add_lock(sub: argparse._SubParsersAction) -> None:
    lk = sub.add_parser("lock", help="resolve base-image digests from the registry into the lock")
    lk.add_argument("--lock", help="lock file (default: containers/lock.yaml)")
    lk.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="REF",
        help="add an image (registry/name:tag) to the lock",
    )
    lk.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="REF",
        help="resolve only this image (repeatable)",
    )
    lk.set_defaults(func=cmd_lock)


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "build",
        help="build the CPU image here (staged, cached), or any "
        "definition with apptainer build [--fakeroot]",
        description="Without --def: the CPU image of containers/cpu/ in three "
        "stages (debootstrap bookworm base, the pinned stack cached by the hash "
        "of its inputs under ~/.cache/scalelab/images/, scalelab as a thin last "
        "stage with %test); its sha256 is written to IMAGE.sha256 and "
        "IMAGE.build.json. With --def FILE: apptainer build [--fakeroot] IMAGE "
        "FILE, e.g. the GPU image on a machine that reaches its base registry.",
    )
    b.add_argument(
        "--def",
        dest="definition",
        help="definition file (e.g. containers/scalelab-gpu.def); default: the "
        "staged CPU image of containers/cpu/",
    )
    b.add_argument(
        "--image",
        help="output .sif (default: <def name>.sif, or scalelab-cpu.sif, in the current directory)",
    )
    b.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU image of containers/gpu/, staged and cached like the CPU image: "
        "Debian base, torch's CUDA 13.0 wheels from envs/lock-pypi.txt, Horovod with "
        "NCCL operations built with PyPI's CUDA tools (envs/lock-cuda-build.txt); "
        "about 24 GB free needed cold; hosts need driver R580+",
    )
    b.add_argument("--no-fakeroot", action="store_true", help="build as root instead (sudo)")
    b.add_argument("--force", action="store_true", help="overwrite an existing image")
    b.add_argument("--notest", action="store_true", help="skip the %%test section")
    b.add_argument(
        "--commit",
        help="source commit label (default: git rev-parse HEAD, -dirty when tracked files changed)",
    )
    b.add_argument(
        "--mksquashfs-args",
        metavar="ARGS",
        help="CPU image: compression of the SIF (default: '-comp zstd "
        "-Xcompression-level 3'; --mksquashfs-args='-comp gzip' for runtimes "
        "without zstd)",
    )
    b.add_argument(
        "--torch-index",
        metavar="URL",
        help="CPU image: take torch from this pip index (e.g. PyTorch's CPU index) "
        "instead of what this machine's pip finds (the tested path uses the local "
        "file pip's find-links holds)",
    )
    _runtime_args(b)
    b.set_defaults(func=cmd_build)


def _add_sign(sub: argparse._SubParsersAction) -> None:
    sg = sub.add_parser(
        "sign",
        help="sign an image with a PEM private key (apptainer sign --key); prints the new sha256",
        description="Adds a signature object to the SIF, which changes its bytes: pin the "
        "sha256 printed here (IMAGE.sha256 beside it is rewritten), not the one of the "
        "unsigned build. Users list the matching public key in container.trusted_keys.",
    )
    sg.add_argument("image")
    sg.add_argument("--key", required=True, help="PEM private key (openssl genpkey)")
    sg.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    sg.set_defaults(func=cmd_sign)


def _add_push(sub: argparse._SubParsersAction) -> None:
    ps = sub.add_parser(
        "push",
        help="apptainer push an image to oras://HOST/NAME:TAG; prints the manifest digest",
        description="Credentials come from `apptainer registry login` (Apptainer's login "
        "store), never from a command line or a config. Prints the manifest digest the "
        "registry holds (the @sha256: of container.registry) and the file's sha256 "
        "(container.sha256); the manifest's layer must be that file.",
    )
    ps.add_argument("image")
    ps.add_argument("uri", metavar="oras://HOST/NAME:TAG")
    ps.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    ps.set_defaults(func=cmd_push)


def _add_pull(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "pull",
        help="apptainer pull an image (http(s)://, oras://, docker://, "
        "library://) and check its sha256, then its signature, before anything uses it",
        description="Pulls into a temporary file beside IMAGE, hashes it, checks its "
        "signature by a trusted key (--key or container.trusted_keys), and moves it into "
        "place only when both pass; an existing IMAGE with other bytes is refused unless "
        "--force. oras://HOST/NAME:TAG@sha256:M pulls manifest M; --sha256 is the file's.",
    )
    pl.add_argument("uri", nargs="?", help="default: container.registry of --config")
    pl.add_argument("--image", help="output .sif (default: the URI's last path part + .sif)")
    pl.add_argument("--sha256", help="pinned sha256 the pulled file must have")
    pl.add_argument(
        "--config",
        help="workflow config: take the pin, the trusted keys, the URI (container.registry) "
        "and --image from its container: section",
    )
    pl.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUBLIC.pem",
        help="trusted public key (repeatable; default: container.trusted_keys)",
    )
    pl.add_argument(
        "--force",
        action="store_true",
        help="replace an existing IMAGE that holds a different (pinned) image",
    )
    _runtime_args(pl)
    pl.set_defaults(func=cmd_pull)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="check the image's sha256 against the pin (and signatures)")
    v.add_argument("image", nargs="?", help="image file (default: container.image of --config)")
    v.add_argument("--sha256", help="pinned sha256 (default: container.sha256 of --config)")
    v.add_argument("--config", help="workflow config with a container: section")
    v.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUBLIC.pem",
        help="accept only signatures by this public key (repeatable; default: "
        "container.trusted_keys of --config)",
    )
    v.add_argument(
        "--signature",
        choices=("auto", "require", "skip"),
        default="auto",
        help="auto: check signatures when the image has any (default); "
        "skip: sha256 only, needs no apptainer. With trusted keys a signature by one "
        "of them is always required",
    )
    v.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    v.add_argument(
        "--json", action="store_true", help="print the verdict as one JSON document on stdout"
    )
    v.set_defaults(func=cmd_verify)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show the image's labels (versions, commit, bases)")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print apptainer's JSON as is")
    i.add_argument("--runtime", choices=("auto", "apptainer", "singularity"), default="auto")
    i.set_defaults(func=cmd_inspect)


def _add_exec(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "exec",
        help="run a command in the image (optionally under srun)",
        description="apptainer exec [--nv] [--bind ...] IMAGE CMD... (or, with --runtime "
        "charliecloud, ch-run on the tree derived from the verified IMAGE; with podman, "
        "podman run --rootfs on that tree); with --srun: "
        "srun --mpi=pmix ... apptainer exec ... (the container call inside srun).",
    )
    e.add_argument("--config", help="workflow config with a container: section")
    e.add_argument("--image", help="image (overrides container.image)")
    e.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:OPTS]]")
    e.add_argument("--no-nv", action="store_true", help="do not pass --nv (CPU image)")
    e.add_argument("--srun", action="store_true", help="wrap in srun (the hybrid MPI model)")
    e.add_argument("--nodes", type=int, default=1)
    e.add_argument("--ntasks-per-node", type=int, default=1)
    e.add_argument(
        "--srun-mpi", help="srun --mpi plugin (default: the config's launch.srun_mpi, else pmix)"
    )
    e.add_argument(
        "--userns",
        choices=("auto", "true", "false"),
        help="pass --userns to apptainer exec (default: container.userns or auto: "
        "where root lacks capabilities)",
    )
    e.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the command to run in the image",
    )
    _runtime_args(e, derived=True)
    e.set_defaults(func=cmd_exec)


def _runtime_args(p: argparse.ArgumentParser, derived: bool = False) -> None:
    """--runtime: the SIF tools, and for `exec` Charliecloud's ch-run and podman too."""
    names = ("auto", "apptainer", "singularity", *(runtime.DERIVED_TREE if derived else ()))
    p.add_argument("--runtime", choices=names, default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the command line, run nothing")
