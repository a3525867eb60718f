"""Run a job's launcher as a child and make the batch system's signals follow the job.

`scalelab launch` is what Slurm (or a user's Ctrl-C) signals: the batch script's
shell, ``scancel --signal``, a time limit. The ranks sit one or two processes
below it (srun/mpirun/torchrun, then Python). Left alone, a TERM kills launch and
leaves the launcher and the ranks running as orphans. Here launch turns TERM, INT
and USR1 into the ranks' stop protocol (checkpoint, then exit 75; see
:mod:`scalelab.train.signals`), waits for them, and returns 75 when the run
stopped after a checkpoint, whatever code the launcher itself chose.

Which signal reaches the ranks intact depends on the launcher (measured here with
Open MPI 5.0.11: ``mpirun`` forwards USR1 to every rank and waits for them, but on
TERM it kills the ranks within about a second, before a checkpoint of any size is
written; ``srun`` forwards USR1 to the step's tasks; torchrun's agent turns TERM
into TERM for its workers and waits up to 30 s). So USR1 is sent to srun and
mpirun, TERM to torchrun and to a rank started directly.

If launch itself is killed outright (SIGKILL, OOM), the child gets SIGTERM from the
kernel (``PR_SET_PDEATHSIG``), so no launcher outlives its supervisor.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from scalelab.errors import EXIT_REQUEUE
from scalelab.rundir import RunDir

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def stop_signal(argv: Sequence[str]) -> signal.Signals:
    """The signal that asks this launcher's ranks to checkpoint and stop."""
    program = Path(argv[0]).name if argv else ""
    if program in ("srun", "mpirun", "mpiexec", "prterun", "orterun"):
        return signal.SIGUSR1
    return signal.SIGTERM


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the signal forwarding below still applies


def stopped_after_checkpoint(run_dir: Path | None) -> bool:
    """Whether the run in ``run_dir`` stopped on a signal after a checkpoint that is still
    there (then the job is to be requeued: exit 75); see :class:`RunDir`."""
    return run_dir is not None and RunDir(run_dir).stopped_after_checkpoint()


def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, run_dir: Path | None = None
) -> int:
    """Run ``argv`` to the end, forwarding stop signals; return the job's exit code."""
    proc = subprocess.Popen(
        list(argv), env=dict(env) if env is not None else None, preexec_fn=_die_with_parent
    )  # noqa: PLW1509 - only prctl
    forward = stop_signal(argv)
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(forward)

    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if code != 0 and stopped_after_checkpoint(run_dir):
        return EXIT_REQUEUE
    if code < 0:  # the launcher died of a signal: report it the shell's way
        return 128 - code
    return code
