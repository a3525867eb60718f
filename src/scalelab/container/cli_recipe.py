"""`scalelab container generate`, `lint` and `lock`: the commands over the recipe files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scalelab.container import generate, lock
from scalelab.container.generate import find_containers_dir
from scalelab.container.lint import lint_file
from scalelab.errors import CheckFailed, UsageError
from scalelab.output_guard import guard

#: User arguments of containers/recipe.py (the GPU image; see its docstring).
RECIPE_OPTIONS = (
    "cuda",
    "distro",
    "arch",
    "python",
    "torch",
    "torch_index",
    "nccl",
    "openmpi",
    "ucx",
    "mpi4py",
    "horovod",
    "cuda_archs",
    "srun_mpi",
    "lock",
    "requirements",
)


def _containers_dir() -> Path:

    return find_containers_dir()


def cmd_generate(args: argparse.Namespace) -> int:

    userarg = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k) is not None}
    if args.allow_unpinned:
        userarg["allow_unpinned"] = "1"
    recipe = Path(args.recipe) if args.recipe else _containers_dir() / "recipe.py"
    if args.out:
        text = generate.render(recipe, userarg)
        if args.out == "-":
            sys.stdout.write(text)
        else:
            with guard(args.out, "definition", is_ours=generate.is_generated) as out:
                generate.write_atomic(out, generate.stamped(text))
            print(f"wrote {args.out}")
        return 0
    if userarg:
        raise UsageError("recipe options change the output: give --out FILE (or --out -)")
    stale = generate.generate_defaults(recipe.parent, check=args.check)
    if args.check:
        for name in stale:
            print(
                f"{recipe.parent / name}: differs from the recipe's output "
                "(run: scalelab container generate)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for name in generate.DEFAULT_IMAGES:
        print(f"{'wrote' if name in stale else 'unchanged'} {recipe.parent / name}")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:

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

    path = Path(args.lock) if args.lock else _containers_dir() / "lock.yaml"
    for ref, old, new in lock.refresh(path, add=args.add, only=args.only):
        state = "unchanged" if old == new else f"was {old}"
        print(f"{ref} {new} ({state})")
    print(f"wrote {path}")
    return 0
