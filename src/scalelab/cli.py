"""The `scalelab` command: one entry point, one sub-command per pipeline step.

Each sub-command lives in its own module that exposes ``register(subparsers)``;
heavy imports (torch, pandas, horovod) happen inside the command functions so
``scalelab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from scalelab import __version__
from scalelab.errors import EXIT_CODES_HELP, EXIT_USAGE, report_error

# Modules that add a sub-command. Order is the order shown in --help.
COMMAND_MODULES = [
    "scalelab.doctor",
    "scalelab.data.cli",
    "scalelab.train.cli",
    "scalelab.launcher",
    "scalelab.evaluate",
    "scalelab.analysis.cli",
    "scalelab.comm.cli",
    "scalelab.container.cli",
    "scalelab.testcluster.cli",
    "scalelab.rerun",
    "scalelab.bundle",
]



class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, exit 2 (its default prints the
    whole usage block first). Sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="scalelab",
        description=(
            "Reproducible distributed deep-learning training and scaling studies: "
            "data staging, DDP/Horovod training on Slurm, evaluation and scaling analysis."
        ),
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"scalelab {__version__}")
    sub = parser.add_subparsers(dest="scalelab_command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = report_error(args.scalelab_command, exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
