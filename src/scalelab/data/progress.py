"""Progress reporting for long operations (staging, hashing, copying, training epochs).

On a terminal it draws a rich progress bar on stderr; in a batch job's log
(no terminal) it writes one plain line at most every 30 s, so Slurm logs show
that staging is alive without filling up with bar redraws.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType


class Progress:
    """A counter with a display; ``advance(n)`` as work is done."""

    def __init__(
        self,
        description: str,
        total: float,
        unit: str,
        enabled: bool | None = None,
        initial: float = 0.0,
    ):
        self.description = description
        self.total = max(float(total), 1.0)
        self.unit = unit
        self.done = float(initial)
        if enabled is None:
            enabled = True
        self._tty = enabled and sys.stderr.isatty()
        self._log = enabled and not self._tty
        self._bar = None
        self._task = None
        self._last_line = time.monotonic()

    def __enter__(self) -> Progress:
        if self._tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done)
        return self

    # The trainer's loop speaks this small part of tqdm's API: one progress library.
    def update(self, n: float = 1) -> None:
        self.advance(n)

    def set_postfix(self, **fields: object) -> None:
        """Show ``key=value`` fields after the description (e.g. the running loss)."""
        if self._bar is not None:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            self._bar.update(self._task, description=f"{self.description} {text}")

    def close(self) -> None:
        self.__exit__(None, None, None)

    def advance(self, n: float) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self._log and time.monotonic() - self._last_line >= 30:
            self._last_line = time.monotonic()
            pct = 100.0 * self.done / self.total
            print(
                f"{self.description}: {self.done:.0f}/{self.total:.0f} {self.unit} ({pct:.0f}%)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
