"""A last-resort timer: abort a rank whose training loop stopped making progress.

torch.distributed enforces ``dist.timeout_s`` on its own collectives (gloo,
NCCL), but Horovod's MPI path has no timeout at all: a rank whose peer died
under ``srun`` (which does not kill the step by default) would wait forever.
The loop calls :meth:`Watchdog.beat` at every step, validation batch and
checkpoint; if no beat comes for ``limit_s``, the process prints why and
exits at once (``os._exit``: a blocked collective cannot be unwound).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from scalelab.errors import EXIT_FAILED

EXIT_STALLED = EXIT_FAILED


class Watchdog:
    """Background thread that ends the process after ``limit_s`` without a beat."""

    def __init__(self, limit_s: float, rank: int) -> None:
        self.limit_s = float(limit_s)
        self.rank = rank
        self._last = time.monotonic()
        self._armed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="scalelab-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def beat(self) -> None:
        """Record progress (and arm the watchdog on the first beat)."""
        self._last = time.monotonic()
        self._armed = True

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(1.0, self.limit_s / 10)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if self._armed and idle > self.limit_s:
                sys.stderr.write(
                    f"scalelab train: rank {self.rank}: no progress for {idle:.0f} s "
                    f"(dist.timeout_s={self.limit_s:g}); a peer is dead or stuck, aborting\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_STALLED)
