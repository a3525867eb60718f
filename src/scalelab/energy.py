"""Energy counters, read at epoch boundaries, for joules per sample.

Two hardware counters exist where scalelab runs, both cumulative, so an interval's
energy is the difference of two reads (no sampling thread, no cost per step):

* **NVML** on NVIDIA GPUs (Volta and newer): ``nvmlDeviceGetTotalEnergyConsumption``,
  the board's energy in millijoules since the driver loaded. Each rank reads its own
  GPU. Needs the ``nvidia-ml-py`` bindings (the ``gpu`` extra).
* **RAPL** on x86 CPUs, through the Linux powercap sysfs tree
  (``/sys/class/powercap/intel-rapl:N/energy_uj``; kernel
  Documentation/power/powercap/powercap.rst). The counters cover a whole CPU package
  and its DRAM, which every rank on the node shares, so only the node's local rank 0
  reads them, and the ranks' sum counts each node once. Since Linux 5.10 the files are
  readable by root only (the Platypus side channel, CVE-2020-8694); a site can grant
  read access, or the figure is reported as unavailable with that reason.

What is summed: GPU boards plus CPU packages and DRAM where readable. Not the
network, the disks, the fans or the power supplies, so the figure is a lower bound
on what the wall socket saw, and the summary says which counters it came from.
Megatron-Core's ``EnergyMonitor`` takes the same approach for GPUs (NVML deltas,
summed over ranks with an all-reduce).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: The powercap tree; SCALELAB_POWERCAP points elsewhere (the tests' stand-in tree,
#: since no VM here exposes RAPL).
POWERCAP = Path(os.environ.get("SCALELAB_POWERCAP", "/sys/class/powercap"))
#: Top-level RAPL zones (one per CPU package); subzones hold core, uncore and DRAM.
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+$")


@dataclass
class _Zone:
    path: Path
    range_uj: int
    last_uj: int


class Rapl:
    """CPU package + DRAM energy of this node, from the powercap sysfs tree.

    Package zones are summed with their ``dram`` subzones only: core and uncore
    (PP0/PP1) are parts of the package figure, and the ``psys`` zone of client
    platforms overlaps the packages, so either would count energy twice.
    """

    name = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones: list[_Zone] = []
        for top in sorted(root.glob("intel-rapl:*")):
            if not _PACKAGE_ZONE.search(top.name) or not _name(top).startswith("package"):
                continue
            self.zones.append(_zone(top))
            self.zones += [
                _zone(sub) for sub in sorted(top.glob(f"{top.name}:*")) if _name(sub) == "dram"
            ]
        if not self.zones:
            raise OSError(f"no RAPL package zones under {root}")

    def joules(self) -> float:
        """Joules since the previous call (or since construction); wraps are undone."""
        total = 0
        for z in self.zones:
            now = int((z.path / "energy_uj").read_text())
            total += now - z.last_uj if now >= z.last_uj else now + z.range_uj - z.last_uj
            z.last_uj = now
        return total / 1e6


def _name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""


def _zone(path: Path) -> _Zone:
    # PermissionError here (root-only since Linux 5.10) makes the counter unavailable
    return _Zone(
        path, int((path / "max_energy_range_uj").read_text()), int((path / "energy_uj").read_text())
    )


class Nvml:
    """The board energy of one NVIDIA GPU, found by UUID: NVML numbers every GPU of the
    node, while CUDA's ordinals count only those in CUDA_VISIBLE_DEVICES."""

    name = "nvml"

    def __init__(self, uuid: str) -> None:
        import pynvml  # nvidia-ml-py: the gpu extra

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        )
        self._read: Callable[[], int] = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        self._last = self._read()  # raises NVMLError_NotSupported before Volta

    def joules(self) -> float:
        now = self._read()
        delta, self._last = now - self._last, now
        return delta / 1e3


#: Every counter kind, in the order of the vector the ranks sum.
SOURCES = ("nvml", "rapl")


@dataclass
class EnergyMeter:
    """This rank's share of the energy used: the counters it owns, read as deltas.

    ``expected`` are the sources this rank should read (its GPU; the CPU packages on a
    node's local rank 0); ``counters`` those it could open; ``reasons`` why the others
    could not be, so the summary says "unavailable: ..." rather than print a zero.
    """

    expected: list[str] = field(default_factory=list)
    counters: dict[str, Rapl | Nvml] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def vector(self) -> list[float]:
        """(joules since the last call, readers, missing) per source, to sum over ranks."""
        out: list[float] = []
        for name in SOURCES:
            c = self.counters.get(name)
            out += [
                c.joules() if c else 0.0,
                float(c is not None),
                float(name in self.expected and c is None),
            ]
        return out


def total(summed: list[float]) -> tuple[float | None, list[str]]:
    """The job's joules from the rank-summed vector, and the sources in it.

    A source counts only when some rank read it and no rank that should have read it
    failed: a sum over part of the nodes would look complete and be too small.
    """
    joules, used = 0.0, []
    for i, name in enumerate(SOURCES):
        j, readers, missing = summed[3 * i : 3 * i + 3]
        if readers > 0 and missing == 0:
            joules += j
            used.append(name)
    return (joules if used else None), used


def open_meter(
    enabled: bool, gpu_uuid: str | None, local_rank: int, powercap: Path = POWERCAP
) -> EnergyMeter:
    """The counters this rank reads (none unless ``metrics.energy`` is ``enabled``).

    A GPU rank reads its board; the node's local rank 0 also reads the CPU packages.
    Ranks that own no counter still take part in the sum (they add zeros).
    """
    meter = EnergyMeter()
    if not enabled:
        meter.reasons = {name: "metrics.energy is false" for name in SOURCES}
        return meter
    if gpu_uuid is not None:
        _try(meter, "nvml", lambda: Nvml(gpu_uuid))
    if local_rank == 0:
        _try(meter, "rapl", lambda: Rapl(powercap))
    return meter


def _try(meter: EnergyMeter, name: str, make: Callable[[], Rapl | Nvml]) -> None:
    meter.expected.append(name)
    try:
        meter.counters[name] = make()
    except ImportError as exc:
        meter.reasons[name] = f"{exc.name} is not installed (pip install 'scalelab[gpu]')"
    except Exception as exc:  # noqa: BLE001 - any failure means: this counter is not there
        meter.reasons[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
