"""The `scalelab` command: one entry point, one table of sub-commands.

The one way a command is registered: every top-level command is named in
:data:`COMMANDS` with the module that implements it, and that module exposes
``register(subparsers)``, which adds exactly the commands the table gives it (a group
such as ``data`` or ``container`` adds its actions below itself) and the old spellings
:data:`DEPRECATED` maps to them. tests/test_cli.py holds every module to its rows.
Heavy imports (torch, pandas, horovod) happen inside the command functions so
``scalelab --help`` stays fast.

``--json``: a command that prints a verdict or a table another program reads takes
``--json`` and then prints exactly one JSON document on stdout, also when it fails: the
entry point prints ``{"ok": false, "command", "error", "exit_code", ...}`` beside the one
error line on stderr. The exit code is the same as without ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import NoReturn

from scalelab import __version__
from scalelab.errors import EXIT_CODES_HELP, EXIT_USAGE, describe, report_error

#: Every top-level command -> the module whose ``register(subparsers)`` adds it.
#: Order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "doctor": "scalelab.doctor",
    "data": "scalelab.data.cli",
    "train": "scalelab.train.cli",
    "plan": "scalelab.study.cli",
    "launch": "scalelab.launcher",
    "evaluate": "scalelab.evaluate",
    "analyze": "scalelab.analysis.cli",
    "commbench": "scalelab.comm.cli",
    "predict": "scalelab.comm.predict_cli",
    "site": "scalelab.sites",
    "container": "scalelab.container.cli",
    "testcluster": "scalelab.testcluster.cli",
    "reproduce": "scalelab.rerun",
    "runs": "scalelab.runs",
    "diff": "scalelab.runs",
    "export": "scalelab.bundle",
    "import": "scalelab.bundle",
    "track": "scalelab.track",
}

#: Spellings of the previous release, kept for one release: old command -> the command
#: that replaced it (its module registers the old one, which names the new spelling).
DEPRECATED: dict[str, str] = {"stage": "data"}

#: The registering modules, each once, in --help order (a test may narrow the list).
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


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
        if getattr(args, "json", False):
            print_failed_verdict(args.scalelab_command, exc, code)
        return code


def print_failed_verdict(command: str, exc: BaseException, code: int) -> None:
    """The --json form of a failed command: one document on stdout (see the module doc)."""
    found = describe(exc)
    verdict = {
        "ok": False,
        "command": command,
        "error": found[0] if found else str(exc),
        "exit_code": code,
        **getattr(exc, "details", {}),
    }
    print(json.dumps(verdict), flush=True)


if __name__ == "__main__":
    sys.exit(main())
