"""``scalelab train --config RUN.yaml --out RUN_DIR [--resume [--reshard]] [--set KEY=VALUE]
[--tracking FILE]``.

``--tracking FILE`` sends the run to MLflow and/or writes TensorBoard event files: FILE
holds a ``tracking:`` section as a study config does (docs/tracking.md). The settings
are written into RUN_DIR (tracking.json), so a later ``--resume`` tracks the same way.

Exit codes: 0 completed (RUN_DIR/summary.json written), 2 bad input (one
line naming the field; nothing written as if complete), 75 stopped by
SIGTERM/SIGUSR1 after saving a checkpoint (requeue and rerun with
``--resume``), 1 any other failure, e.g. a dead or stuck peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from scalelab.errors import UsageError, process_rank, report_error
from scalelab.layout import detect
from scalelab.rundir import RunDir
from scalelab.tracking import config as tracking_config
from scalelab.train import config, run
from scalelab.train.signals import Preempted


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (any launcher: torchrun, srun, mpirun, or one process)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="RUN.yaml",
        help="run configuration (YAML); omitted: all defaults",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="RUN_DIR",
        help="run directory (config, metrics, checkpoints, summary)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in RUN_DIR (fresh start if there is none)",
    )
    p.add_argument(
        "--reshard",
        action="store_true",
        help="with --resume: accept a checkpoint written at another world size or "
        "tp (sharded checkpoints are resharded to this job's layout); without "
        "it such a resume is refused. With dist.elastic set the config is that consent, "
        "and a restart by torchrun's elastic agent (TORCHELASTIC_RESTART_COUNT > 0) "
        "resumes by itself",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field (value parsed as YAML)",
    )
    p.add_argument(
        "--tracking",
        type=Path,
        metavar="FILE",
        help="track the run: FILE (YAML) holds a study's 'tracking:' section (MLflow server, "
        "TensorBoard); credentials only from $MLFLOW_TRACKING_TOKEN or "
        "$MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="take over a stale lock of RUN_DIR whose writer cannot be proven dead",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print every config field with its default and meaning, then exit",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the trainer; see the module docstring for exit codes."""

    if args.explain:
        print("\n".join(config.explain()))
        return 0
    if args.out is None:
        raise UsageError("--out RUN_DIR is required")
    cfg = config.load(args.config, args.overrides)
    tracking = None
    if args.tracking is not None:  # checked before anything is written or trained
        tracking = tracking_config.for_run_dir(tracking_config.load_file(args.tracking), args.out)
    try:
        with RunDir(args.out).lock(force=args.force):
            run(cfg, args.out, resume=args.resume, reshard=args.reshard, tracking=tracking)
    except Preempted as exc:
        print(f"scalelab train: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except BaseException as exc:
        if not _has_peers():
            raise  # scalelab.cli reports user errors in one line, bugs with a traceback
        # A peer may be dead: interpreter shutdown (process-group destructors, Horovod's
        # atexit) could block on it. Report and leave at once.
        code = 130 if isinstance(exc, KeyboardInterrupt) else report_error("train", exc)
        if code is None and _peer_lost(exc):
            # A consequence, not a cause: the rank that failed first reports why.
            print(
                f"scalelab train: rank {process_rank()} stopped: a peer failed "
                f"({str(exc).splitlines()[0][:160]})",
                file=sys.stderr,
                flush=True,
            )
            code = 1
        if code is None:
            traceback.print_exc()
            print(
                f"scalelab train: error: {type(exc).__name__}: {exc}".splitlines()[0],
                file=sys.stderr,
                flush=True,
            )
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if _has_peers():
        # Everything is written (summary last). Leave without interpreter teardown:
        # collective-library destructors may block on threads of a finished peer.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


#: What gloo, NCCL and MPI say when the other side of a collective went away.
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "timed out",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "HorovodInternalError",
)


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says that another rank died or hung (the cause lies there)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _PEER_LOST)


def _has_peers() -> bool:

    try:
        return detect(allow_mpi_query=False).world_size > 1
    except UsageError:
        return True
