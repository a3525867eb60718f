"""The trainer: ``scalelab train`` and its Python API :func:`run`.

Importing this package is cheap (no torch); :func:`run` imports the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalelab.tracking.config import RunSettings
from scalelab.train.config import RunConfig, load
from scalelab.train.signals import EXIT_PREEMPTED, Preempted

__all__ = ["EXIT_PREEMPTED", "Preempted", "RunConfig", "load", "run"]


def run(
    config: RunConfig | dict | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overrides: list[str] | None = None,
    reshard: bool = False,
    tracking: RunSettings | None = None,
) -> dict[str, Any]:
    """Train (every rank of the job calls this) and return the summary dict.

    ``config``: a RunConfig, a nested dict or a YAML path; ``overrides``:
    ``key.path=value`` strings; ``tracking``: settings rank 0 writes into RUN_DIR
    before it trains (None: keep what a launch wrote there). Raises UsageError on bad
    input (nothing written) and Preempted after a stop signal (checkpoint written).
    """
    from scalelab.train.loop import run as _run

    return _run(
        config, out_dir, resume=resume, overrides=overrides, reshard=reshard, tracking=tracking
    )
