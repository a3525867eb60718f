"""Energy per sample: the RAPL reader, the rank sum, and a real 2-rank run.

RAPL cannot exist in this VM (no /sys/class/powercap), and NVML needs a GPU. So the
reader is tested against a **stand-in powercap tree**: plain files laid out as the
kernel lays them out (Documentation/power/powercap/powercap.rst), whose counters a
thread advances at a known power. Everything above the files is real: the trainer,
torchrun, the all-reduce of the counters, the summary. The machine's own tree is
tested too: there the figure must be reported unavailable with its reason.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import scalelab_main
from train_support import PY, TINY, TORCHRUN, TRAIN, deep_update, ok, run, write_config

from scalelab import energy


class StandInRapl:
    """A powercap tree with one package (core and dram subzones) and a psys zone, whose
    counters advance at ``watts`` (package), ``dram_w`` and ``psys_w`` (overlapping: must
    not be counted), wrapping at ``range_uj`` like the hardware's."""

    def __init__(
        self, root: Path, watts: float, dram_w: float = 0.0, range_uj: int = 262_143_328_850
    ) -> None:
        self.root, self.range = root, range_uj
        self.rates = {
            "intel-rapl:0": watts,
            "intel-rapl:0/intel-rapl:0:0": watts / 2,
            "intel-rapl:0/intel-rapl:0:1": dram_w,
            "intel-rapl:1": 3 * watts,
        }
        names = {
            "intel-rapl:0": "package-0",
            "intel-rapl:0/intel-rapl:0:0": "core",
            "intel-rapl:0/intel-rapl:0:1": "dram",
            "intel-rapl:1": "psys",
        }
        for zone, name in names.items():
            (root / zone).mkdir(parents=True, exist_ok=True)
            (root / zone / "name").write_text(name + "\n")
            (root / zone / "max_energy_range_uj").write_text(f"{range_uj}\n")
        self.start = time.monotonic()
        self.offset = range_uj - 5_000_000  # start near the top: the first wrap comes soon
        self.write(0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, elapsed: float | None = None) -> None:
        """The counters after ``elapsed`` seconds (default: the time since the start)."""
        elapsed = time.monotonic() - self.start if elapsed is None else elapsed
        for zone, watts in self.rates.items():
            value = int(self.offset + watts * elapsed * 1e6) % self.range
            tmp = self.root / zone / ".energy_uj"
            tmp.write_text(f"{value}\n")
            os.replace(tmp, self.root / zone / "energy_uj")  # sysfs reads are atomic too

    def __enter__(self) -> StandInRapl:
        def tick() -> None:
            while not self._stop.wait(0.002):
                self.write()

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def test_rapl_sums_packages_and_dram_only_and_undoes_wraps(tmp_path):
    tree = StandInRapl(tmp_path, watts=40.0, dram_w=10.0, range_uj=20_000_000)
    meter = energy.Rapl(tmp_path)
    assert [z.path.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:0:1"]
    tree.write(0.3)  # package: 12 J from 5 J below the top of its 20 J range, so it wraps
    # 50 W x 0.3 s (package + dram): not 12 (dram left out), 18 (core counted twice),
    # 51 (psys counted) or a negative figure (the wrap not undone)
    assert meter.joules() == pytest.approx(15.0, abs=1e-5)
    tree.write(0.5)
    assert meter.joules() == pytest.approx(10.0, abs=1e-5)  # deltas: since the last read


def test_rapl_unreadable_tree_is_an_error_naming_it(tmp_path):
    with pytest.raises(OSError, match=str(tmp_path)):
        energy.Rapl(tmp_path)


def test_total_counts_a_source_only_when_every_rank_that_should_read_it_did():
    # per source: (joules, readers, missing), summed over ranks; sources: nvml, rapl
    assert energy.total([300.0, 2, 0, 50.0, 1, 0]) == (350.0, ["nvml", "rapl"])
    assert energy.total([300.0, 2, 0, 40.0, 1, 1]) == (300.0, ["nvml"])  # a node unreadable
    assert energy.total([0.0, 0, 0, 0.0, 0, 1]) == (None, [])


def test_open_meter_on_this_machine_reads_or_says_why(tmp_path):
    meter = energy.open_meter(True, None, local_rank=0, powercap=Path("/sys/class/powercap"))
    assert meter.expected == ["rapl"]
    if "rapl" in meter.counters:
        assert meter.vector()[3:] == [pytest.approx(meter.vector()[3]), 1.0, 0.0]
    else:
        assert (
            "/sys/class/powercap" in meter.reasons["rapl"] or "Permission" in meter.reasons["rapl"]
        ), meter.reasons
    off = energy.open_meter(False, None, local_rank=0)
    assert not off.counters and off.reasons["rapl"] == "metrics.energy is false"
    other = energy.open_meter(True, None, local_rank=1, powercap=tmp_path)
    assert other.expected == [] and other.vector() == [0.0] * 6  # node counted once


def test_two_ranks_on_one_node_count_its_energy_once(tmp_path):
    """2 ranks (torchrun) on a node drawing 60 W: ~60 W, not 120 (each rank reading the
    packages); joules per sample = joules / samples of the timed epochs."""
    watts = 60.0
    # epochs of ~1 s: the stand-in's counters lag real time by a tick (2 ms, more on a busy
    # machine), which must stay small against the measured interval
    cfg = deep_update(TINY, {"data": {"num_samples": 4096}, "train": {"epochs": 3}})
    conf = write_config(tmp_path / "run.yaml", cfg)
    out = tmp_path / "run"
    with StandInRapl(tmp_path / "powercap", watts, range_uj=400_000_000):
        ok(
            run(
                [*TORCHRUN, *TRAIN, "--config", str(conf), "--out", str(out)],
                timeout=240,
                extra_env={"SCALELAB_POWERCAP": str(tmp_path / "powercap")},
            )
        )
    s = json.loads((out / "summary.json").read_text())
    assert s["energy_sources"] == ["rapl"] and s["energy_unavailable"] == {}, s
    assert 0.7 * watts < s["energy_power_w"] < 1.3 * watts, s["energy_power_w"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert [e["energy_samples"] for e in epochs] == [4096] * 3
    assert s["energy_j"] == pytest.approx(sum(e["energy_j"] for e in epochs[1:]))
    assert s["joules_per_sample"] == pytest.approx(s["energy_j"] / (2 * 4096))
    # the analysis carries it: scaling.csv always, scaling.md's table where measured
    rc, _, err = scalelab_main("analyze", out, "--out", tmp_path / "analysis")
    assert rc == 0, err
    table = pd.read_csv(tmp_path / "analysis" / "scaling.csv")
    assert table["joules_per_sample"].iloc[0] == pytest.approx(s["joules_per_sample"])
    assert "J/sample" in (tmp_path / "analysis" / "scaling.md").read_text()


def test_a_run_here_reports_energy_unavailable_with_the_reason(tmp_path):
    """On this VM there is no counter: the summary says so, and why, instead of a 0."""
    conf = write_config(tmp_path / "run.yaml", TINY)
    rc, _, err = scalelab_main("train", "--config", conf, "--out", tmp_path / "run")
    assert rc == 0, err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    rc, _, err = scalelab_main("analyze", tmp_path / "run", "--out", tmp_path / "analysis")
    assert rc == 0, err
    md = (tmp_path / "analysis" / "scaling.md").read_text()
    assert ("J/sample" in md) == (s["joules_per_sample"] is not None)  # no column of blanks
    if Path("/sys/class/powercap/intel-rapl:0/energy_uj").exists() and os.access(
        "/sys/class/powercap/intel-rapl:0/energy_uj", os.R_OK
    ):
        assert s["energy_j"] > 0 and s["energy_sources"] == ["rapl"]
    else:
        assert s["energy_j"] is None and s["joules_per_sample"] is None
        assert "rapl" in s["energy_unavailable"], s["energy_unavailable"]
    rc, _, err = scalelab_main(
        "train", "--config", conf, "--out", tmp_path / "off", "--set", "metrics.energy=false"
    )
    assert rc == 0, err
    off = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert off["energy_unavailable"] == {
        "nvml": "metrics.energy is false",
        "rapl": "metrics.energy is false",
    }


def test_doctor_says_which_counters_a_run_could_read(tmp_path):
    """`scalelab doctor` probes the counters (optional for every mode): none on this VM,
    with the reasons; the stand-in tree's two zones when pointed at it."""
    here = json.loads(run([str(Path(PY).parent / "scalelab"), "doctor", "--json"]).stdout)
    here_probe = {p["name"]: p for p in here["probes"]}["energy"]
    assert "rapl:" in here_probe["detail"] and "nvml:" in here_probe["detail"], here_probe
    StandInRapl(tmp_path, watts=10.0)
    env = {"SCALELAB_POWERCAP": str(tmp_path)}
    proc = ok(run([str(Path(PY).parent / "scalelab"), "doctor", "--json"], extra_env=env))
    probe = {p["name"]: p for p in json.loads(proc.stdout)["probes"]}["energy"]
    assert probe["ok"] and "rapl: 2 zone(s) readable" in probe["detail"], probe
    table = ok(run([str(Path(PY).parent / "scalelab"), "doctor"], extra_env=env)).stdout
    assert "energy" in table and "rapl: 2 zone(s)" in table
    if "nvidia-ml-py not installed" in here_probe["detail"]:  # brackets are text, not markup
        assert "'scalelab[gpu]'" in ok(run([str(Path(PY).parent / "scalelab"), "doctor"])).stdout
