"""Stop requests from the batch system: SIGUSR1 / SIGTERM -> checkpoint, exit 75.

Slurm sends SIGTERM on ``scancel`` and at the time limit, and any signal asked
for with ``--signal=USR1@120`` ahead of it. The handler only sets a flag; the
training loop looks at it at the next step boundary, where all ranks agree on
it with an allreduce (so a signal seen by one rank stops all of them at the
same step), save a checkpoint, and the process exits with
:data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL) so a job script can requeue
(``scontrol requeue $SLURM_JOB_ID``) and the next run passes ``--resume``.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from scalelab.errors import EXIT_REQUEUE, ScalelabError

EXIT_PREEMPTED = EXIT_REQUEUE
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(ScalelabError):
    """The run stopped on a signal after saving a checkpoint; resume with ``--resume``."""

    exit_code = EXIT_REQUEUE


class StopRequest:
    """Remembers the first stop signal received while installed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> StopRequest:
        """Install handlers (main thread only; elsewhere signals keep their old meaning)."""
        if threading.current_thread() is not threading.main_thread():
            print(
                "scalelab train: not in the main thread; stop signals are not handled",
                file=sys.stderr,
            )
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
