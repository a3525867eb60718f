"""The lane between the training thread and a tracking server: never a wait in a step.

The training thread only puts items on a queue (no I/O, no lock held across a request).
One daemon thread sends them in order, each request bounded by the client's timeout. The
first failure marks the server unreachable for the rest of the run: later items are not
tried, only counted (a server that is down or hangs costs one timeout, once, off the
training thread). :meth:`Sender.close` waits at most its bound for the queue to drain and
then returns what was not sent; a thread still stuck in a request is left behind (a daemon,
it sends nothing more).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Items a run may queue before new ones are counted as not sent (a server far slower than
#: training must not grow memory without end).
MAX_QUEUED = 10_000


@dataclass
class Item:
    """One request to make: what it is (for the not-sent line), how many values it holds."""

    what: str
    count: int
    send: Callable[[], None]


#: Called in the sending thread after each item the server accepted: (sender name, item).
#: For observers of the lane, such as a test that stops the server after the first epoch.
OBSERVERS: list[Callable[[str, Item], None]] = []


class Sender:
    """A daemon thread that sends :class:`Item` s in order; see the module doc."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: queue.Queue[Item | None] = queue.Queue(MAX_QUEUED)
        self.lock = threading.Lock()
        #: Every item put and not (yet) accepted by the server: id -> (place, item).
        self.pending: dict[int, tuple[int, Item]] = {}
        self.sent = 0
        self.error: str | None = None
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._work, name=f"scalelab-{name}", daemon=True)
        self.thread.start()

    def put(self, item: Item) -> None:
        """Queue an item (never blocks); after close or a failure it is only counted."""
        with self.lock:
            self.pending[id(item)] = (len(self.pending) + self.sent, item)
        if self.closed.is_set() or self.error is not None:
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._fail(f"more than {MAX_QUEUED} items waiting for the server")

    def _fail(self, reason: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = reason

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None or self.closed.is_set():
                continue  # stays pending: counted as not sent
            try:
                item.send()
            except Exception as exc:  # a tracker never breaks training: count it, stop
                self._fail(str(exc) or type(exc).__name__)
                continue
            with self.lock:
                self.pending.pop(id(item), None)
                self.sent += 1
            for observer in list(OBSERVERS):
                with contextlib.suppress(Exception):  # an observer's error is not ours
                    observer(self.name, item)

    def close(self, wait_s: float) -> list[Item]:
        """Wait at most ``wait_s`` for what is queued; return every item not sent, in the
        order it was put."""
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=max(0.0, wait_s))
        self.thread.join(max(0.0, deadline - time.monotonic()))
        self.closed.set()
        busy = self.thread.is_alive()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # a thread stuck in a request ends after it
        with self.lock:
            if busy and self.pending and self.error is None:
                self.error = f"the server was still busy after {wait_s:g} s at the end of the run"
            return [item for _, item in sorted(self.pending.values(), key=lambda p: p[0])]
