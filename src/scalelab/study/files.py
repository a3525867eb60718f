"""The study's files and directory, before Snakemake reads them: the preflight.

The Snakefile calls :func:`workflow_preflight` before its ``configfile:`` line; ``scalelab
plan`` checks the study directory the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scalelab import docload
from scalelab.errors import UsageError
from scalelab.study.checks import _PATH_CHARS, _PATH_RE

#: How to accept a YTE config, in `--plan` and in the workflow.
YTE_HINT_PLAN = "pass --allow-yte if you trust its author"
YTE_ENV = "SCALELAB_ALLOW_YTE"
YTE_HINT_WORKFLOW = f"set {YTE_ENV}=1 if you trust its author"


def check_study_dir(
    path: str | Path, where: str = "study directory", source: str = "workflow"
) -> None:
    """The study's own path reaches job scripts like every config path (Snakemake writes
    ``--home`` and ``--snakefile`` from it under ``--sdm apptainer``, quoted with Python's
    repr: a ``'`` in it lets ``$(...)`` run), so it gets the same safe character set."""
    text = str(path)
    for ch in text:
        if not _PATH_RE.fullmatch(ch):
            raise UsageError(
                f"{source}: {where} {text!r}: character {ch!r} is not allowed in a path "
                f"(allowed: {_PATH_CHARS}); rename or move the study"
            )


def preflight(
    default_configfile: str | Path,
    cli_configfiles: list,
    snakefile_dir: str | Path,
    workdir: str | Path | None = None,
) -> None:
    """What the Snakefile runs before its ``configfile:`` line: the study's paths, and
    every config file read by the one document loader (duplicate keys, alias bombs,
    encodings, YTE) before Snakemake's own loader uses it. Files given with
    ``--configfile`` were already read by Snakemake (a YTE one has run), so this stops
    the workflow there; the default config is checked before Snakemake reads it."""

    check_study_dir(os.path.abspath(workdir or os.getcwd()))
    check_study_dir(os.path.abspath(snakefile_dir), "Snakefile directory")
    files = [Path(p) for p in cli_configfiles]
    if Path(default_configfile).exists():
        files.insert(0, Path(default_configfile))
    allow = os.environ.get(YTE_ENV) == "1"
    for path in files:
        doc = docload.load(path)
        if not allow:
            docload.refuse_yte(doc, str(path), YTE_HINT_WORKFLOW)


def workflow_preflight(workflow: Any, default_configfile: str) -> None:
    """:func:`preflight` from the Snakefile: one line and exit 2 on a bad study or file."""
    import sys

    try:
        preflight(default_configfile, list(workflow.overwrite_configfiles or []), workflow.basedir)
    except UsageError as exc:
        print(f"scalelab workflow: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
