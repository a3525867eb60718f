"""The `scalelab` command: one entry point, one sub-command per pipeline step.

Each sub-command lives in its own module that exposes ``register(subparsers)``;
heavy imports (torch, pandas, horovod) happen inside the command functions so
``scalelab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scalelab import __version__
from scalelab.errors import UsageError

# Modules that add a sub-command. Order is the order shown in --help.
COMMAND_MODULES = [
    "scalelab.doctor",
    "scalelab.data.cli",
    "scalelab.train.cli",
    "scalelab.runner",
    "scalelab.evaluate",
    "scalelab.analysis.cli",
    "scalelab.comm.cli",
    "scalelab.container.cli",
    "scalelab.testcluster.cli",
]



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalelab",
        description=(
            "Reproducible distributed deep-learning training and scaling studies: "
            "data staging, DDP/Horovod training on Slurm, evaluation and scaling analysis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"scalelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"scalelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
