"""The trainer's energy bookkeeping: counter reads at an epoch's marks, summed over ranks.

The counters themselves live in :mod:`scalelab.energy`; this ledger reads them at an
epoch's start (discarded: only the mark) and after its last step (kept with the
samples trained since the start, validation excluded), and turns the kept reading into
the epoch record's ``energy_*`` fields with one small collective per epoch.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from scalelab.backends import Backend
from scalelab.energy import open_meter
from scalelab.energy import total as energy_total


class EnergyLedger:
    """One rank's energy readings of the running epoch (nothing at all when disabled)."""

    def __init__(
        self, enabled: bool, backend: Backend, device: torch.device, local_rank: int
    ) -> None:
        self.enabled, self.backend, self.device = enabled, backend, device
        self.meter = open_meter(enabled, _gpu_uuid(device), local_rank)
        self.epoch_energy: list[float] | None = None  # this rank's, until summed
        self.epoch_samples, self.epoch_energy_s, self.energy_since = 0, 0.0, 0.0

    @property
    def reasons(self) -> dict[str, str]:
        """Why a counter could not be opened (this rank's), for the summary."""
        return self.meter.reasons

    def mark(self, samples: int | None = None) -> None:
        """Read the energy counters: at an epoch's start (discarded) and after its last
        step (kept with the samples trained since the start, validation excluded)."""
        if not self.enabled:
            return
        vector, now = self.meter.vector(), time.perf_counter()
        if samples is not None:
            self.epoch_energy, self.epoch_samples = vector, samples
            self.epoch_energy_s = now - self.energy_since
        self.energy_since = now

    def epoch_fields(self) -> dict[str, Any]:
        """The epoch's joules summed over ranks (one small collective per epoch; every rank
        calls it, and every rank has a reading or none alike)."""
        if self.epoch_energy is None:
            return {}
        summed = self.backend.allreduce_async(
            torch.tensor(self.epoch_energy, dtype=torch.float64, device=self.device)
        )()
        joules, sources = energy_total(summed)
        self.epoch_energy = None
        return {
            "energy_j": joules,
            "energy_sources": sources,
            "energy_samples": self.epoch_samples,
            "energy_s": self.epoch_energy_s,
        }


def _gpu_uuid(device: torch.device) -> str | None:
    """The UUID NVML knows this rank's GPU by (None on the CPU)."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)
