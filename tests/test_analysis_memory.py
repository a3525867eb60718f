"""The analysis' memory figures and tp series, in-process on hand-written run directories
(the real ones come from the sharding workflow test, tests/test_sharding_workflow.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from scalelab.analysis import report, report_sections, runs, runs_csv, scaling


def _run(
    root: Path,
    run_id: str,
    backend: str,
    ranks: int,
    tp: int,
    state: tuple[int, int, int] | None,
    samples_per_s: float,
) -> Path:
    d = root / run_id
    d.mkdir(parents=True)
    summary = {
        "world_size": ranks,
        "samples_per_s": samples_per_s,
        "global_batch_size": 32,
        "steps_per_epoch": 8,
        "backend": backend,
    }
    if state:
        p, g, o = state
        summary.update(
            rank0_param_bytes=p,
            rank0_grad_bytes=g,
            rank0_optim_state_bytes=o,
            rank0_state_bytes=p + g + o,
        )
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "sweep.json").write_text(
        json.dumps({"run_id": run_id, "backend": backend, "mode": "strong", "nodes": 1, "tp": tp})
    )
    return d


@pytest.fixture
def study(tmp_path):
    mib = 2**20
    _run(tmp_path, "ddp-1", "ddp", 1, 1, (4 * mib, 4 * mib, 8 * mib), 100.0)
    _run(tmp_path, "ddp-2", "ddp", 2, 1, (4 * mib, 4 * mib, 8 * mib), 190.0)
    _run(tmp_path, "fsdp-2", "fsdp", 2, 1, (2 * mib, 2 * mib, 4 * mib), 170.0)
    _run(tmp_path, "ddp-2-tp2", "ddp", 2, 2, (3 * mib, 3 * mib, 6 * mib), 120.0)
    frame = runs.to_frame(runs.load_runs([tmp_path]))
    return frame, *scaling.analyse(frame)


def test_memory_columns_and_ratio_against_ddp(study):
    frame, table, _ = study
    row = frame.set_index("run_id").loc["fsdp-2"]
    assert (row["param_bytes_per_rank"], row["optim_state_bytes_per_rank"]) == (2**21, 2**22)
    assert math.isnan(row["cuda_max_allocated_bytes"])  # CPU run: none
    at = table.set_index(["backend", "tp", "ranks"])
    assert at.loc[("fsdp", 1, 2), "memory_vs_ddp"] == pytest.approx(6 / 12)
    assert at.loc[("ddp", 2, 2), "memory_vs_ddp"] == pytest.approx(9 / 12)
    assert at.loc[("ddp", 1, 2), "memory_vs_ddp"] == pytest.approx(1.0)


def test_tp_is_its_own_series(study):
    _, table, fits = study
    # the tp=2 point is not ddp's 2-rank point: its own baseline, efficiency 1
    at = table.set_index(["backend", "tp", "ranks"])
    assert at.loc[("ddp", 2, 2), "efficiency"] == pytest.approx(1.0)
    assert at.loc[("ddp", 1, 2), "efficiency"] == pytest.approx(190 / 200)
    assert sorted(zip(fits["backend"], fits["tp"], strict=True)) == [
        ("ddp", 1),
        ("ddp", 2),
        ("fsdp", 1),
    ]


def test_sentence_says_what_sharding_bought(study):
    _, table, _ = study
    sentence = report_sections.sharding_sentence(table)
    assert sentence.startswith(
        "What sharding bought: fsdp at 2 ranks holds 0.50x of ddp's "
        "parameter + optimizer-state bytes per rank (6 vs 12 MiB)"
    )
    assert "ddp tp=2 at 2 ranks 0.75x (9 vs 12 MiB)" in sentence
    md = report.markdown(table, scaling.fit_models(table, 0.7), 0.7, ["runs"])
    assert sentence in md
    assert "| ddp | strong | 2 | 2 | 3 | 3 | 6 | 12 | - | 0.75 |" in md


def test_no_memory_figures_nothing_to_compare(tmp_path):
    _run(tmp_path, "ddp-1", "ddp", 1, 1, None, 100.0)
    _run(tmp_path, "fsdp-2", "fsdp", 2, 1, None, 150.0)
    table, _ = scaling.analyse(runs.to_frame(runs.load_runs([tmp_path])))
    assert table["memory_vs_ddp"].isna().all()
    assert "nothing to compare" in report_sections.sharding_sentence(table)


def test_csv_rows_carry_tp(tmp_path):
    csv = tmp_path / "tp.csv"
    csv.write_text("gpus,throughput,tp\n2,100,1\n4,190,1\n4,120,2\n8,230,2\n")
    table, _ = scaling.analyse(runs.to_frame(runs_csv.load_csv(csv)))
    t = table.set_index(["tp", "workers"])
    assert t.loc[(2, 8), "speedup"] == pytest.approx(230 / 120)
    assert t.loc[(1, 4), "speedup"] == pytest.approx(1.9)
    plain = tmp_path / "plain.csv"
    plain.write_text("gpus,throughput\n1,10\n2,19\n")
    assert set(pd.DataFrame(runs_csv.load_csv(plain))["tp"]) == {1.0}


def test_no_sharded_run_says_how_to_measure_it(tmp_path):
    """The default study (ddp and horovod only): the sentence says there was no sharded run
    and which sweep knob measures one, not that figures were missing."""
    _run(tmp_path, "ddp-1", "ddp", 1, 1, (4, 4, 4), 100.0)
    _run(tmp_path, "ddp-2", "ddp", 2, 1, (4, 4, 4), 150.0)
    table, _ = scaling.analyse(runs.to_frame(runs.load_runs([tmp_path])))
    sentence = report_sections.sharding_sentence(table)
    assert "no sharded run in this study" in sentence and "fsdp" in sentence
