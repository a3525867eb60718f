"""Where a run is and what it has seen: the part of a checkpoint that is not weights.

:class:`TrainState` holds the position as the *next* step to run (``epoch``,
``step_in_epoch``; the data order is a function of seed and epoch, see
:mod:`scalelab.train.sampling`), the global step count, the running epoch's
statistics and the finished epochs' records. Its :meth:`~TrainState.state_dict`
keys are the checkpoint's top-level keys, so checkpoints keep one flat format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scalelab.train.records import EpochStats


@dataclass
class TrainState:
    """Position, statistics and history of one run (restored by a resume)."""

    #: The epoch to run next and the optimizer steps of it already done.
    epoch: int = 0
    step_in_epoch: int = 0
    #: Optimizer steps done since the run began (over all resumes).
    global_step: int = 0
    #: How many times this run was resumed from a checkpoint.
    resumes: int = 0
    #: Sums of the running epoch so far (global over ranks).
    stats: EpochStats = field(default_factory=EpochStats)
    #: One record per finished epoch (what metrics.jsonl's epoch lines hold).
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The world sizes the run trained at, in order: one entry per start whose world size
    #: differs from the previous one (``global_step``, ``world_size``, ``restart_count``).
    membership: list[dict[str, int]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "resumes": self.resumes,
            "stats": self.stats.to_dict(),
            "history": list(self.history),
            "membership": list(self.membership),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.resumes = state.get("resumes", 0)
        self.stats = EpochStats(**state["stats"])
        self.history = list(state["history"])
        self.membership = list(state.get("membership", []))  # older checkpoints: none

    def join(self, world_size: int, restart_count: int) -> dict[str, int] | None:
        """Note this start's world size; the new entry when it differs from the last one
        (a membership change, or the first start), else None."""
        if self.membership and self.membership[-1]["world_size"] == world_size:
            return None
        entry = {
            "global_step": self.global_step,
            "world_size": world_size,
            "restart_count": restart_count,
        }
        self.membership.append(entry)
        return entry

    @property
    def world_sizes(self) -> list[int]:
        """The world sizes the run trained at, in order (a change when more than one)."""
        return [m["world_size"] for m in self.membership]

    def next_epoch(self) -> None:
        """Move to the start of the next epoch with fresh statistics."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.stats = EpochStats()
