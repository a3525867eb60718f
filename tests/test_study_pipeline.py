"""Issue 27, the study side: the sweep's ``pp``, ``microbatches`` and ``schedule`` lists,
the combinations the plan skips (with the layout's own reasons), the same points written
explicitly as one error line naming the field, and the pipeline columns of the runs table
and the report. In-process and torch-free: no training runs here."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml
from conftest import REPO

from scalelab import cli, launcher
from scalelab.analysis import columns, report, report_sections, runs, runs_csv, scaling
from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.pipeline_rules import bubble_fraction
from scalelab.errors import UsageError
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan
from scalelab.train.batch import resolve_batch
from scalelab.train.config import from_dict

SHARDING = yaml.safe_load((REPO / ".test" / "sharding.yaml").read_text())
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SHIPPED = sorted([*REPO.glob("config/*.yaml"), *REPO.glob(".test/*.yaml")])
PLAN_SCHEMA = json.loads((REPO / "src" / "scalelab" / "schemas" / "plan.schema.json").read_text())


def _gpt(size: str = "mini", **sweep) -> dict:
    """The sharding study's GPT on generated tokens, at ``size``, with ``sweep`` lists."""
    cfg = copy.deepcopy(SHARDING)
    cfg["train"]["model"]["options"] = {"size": size}
    del cfg["sweep"]["tp"]
    cfg["sweep"].pop("pp", None)  # .test/sharding.yaml sweeps pp; these tests set their own
    cfg["sweep"].update(backends=["ddp"], **sweep)
    return cfg


def _error(cfg: dict) -> str:
    with pytest.raises(UsageError) as err:
        study_config.validate(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def _shipped(path: Path, tmp_path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    if cfg["data"].get("path"):  # an imagefolder config names the site's dataset
        (tmp_path / "images").mkdir(exist_ok=True)
        cfg["data"]["path"] = str(tmp_path / "images")
    return cfg


# --------------------------------------------------------------------------- the plan


def test_pp_by_tp_by_microbatches_on_a_four_layer_gpt():
    """pp [1, 2] x tp [1, 2] x m [1, 2, 8] at 1, 2 and 4 ranks, global batch 24."""
    cfg = _gpt(tp=[1, 2], pp=[1, 2], microbatches=[1, 2, 8], tasks_per_node=[1, 2, 4])
    cfg["train"]["optim"]["global_batch_size"] = 24
    points, skipped = study_plan.plan(study_config.validate(cfg))
    assert [p.run_id for p in points] == [  # the lists' order; pp=1 once, whatever m
        "ddp-strong-n1-t1-g0-r0",
        "ddp-strong-n1-t2-g0-r0",
        "ddp-strong-n1-t2-g0-pp2-m2-r0",
        "ddp-strong-n1-t2-g0-pp2-m8-r0",
        "ddp-strong-n1-t2-g0-tp2-r0",
        "ddp-strong-n1-t4-g0-r0",
        "ddp-strong-n1-t4-g0-pp2-m2-r0",
        "ddp-strong-n1-t4-g0-tp2-r0",
        "ddp-strong-n1-t4-g0-tp2-pp2-m2-r0",
        "ddp-strong-n1-t4-g0-tp2-pp2-m8-r0",
    ]
    why = {s.point.run_id: s.reason for s in skipped}
    m_below_pp = "schedule 1f1b needs m >= pp = 2 micro-batches, not 1"
    assert why == {
        "ddp-strong-n1-t1-g0-pp2-m1-r0": m_below_pp,
        "ddp-strong-n1-t1-g0-pp2-m2-r0": "tp x pp = 1 x 2 needs a multiple of 2 ranks; "
        "this point has 1",
        "ddp-strong-n1-t1-g0-pp2-m8-r0": "tp x pp = 1 x 2 needs a multiple of 2 ranks; "
        "this point has 1",
        "ddp-strong-n1-t1-g0-tp2-r0": "tp=2 needs a multiple of 2 ranks; this point has 1",
        "ddp-strong-n1-t1-g0-tp2-pp2-m1-r0": m_below_pp,
        "ddp-strong-n1-t1-g0-tp2-pp2-m2-r0": "tp x pp = 2 x 2 needs a multiple of 4 ranks; "
        "this point has 1",
        "ddp-strong-n1-t1-g0-tp2-pp2-m8-r0": "tp x pp = 2 x 2 needs a multiple of 4 ranks; "
        "this point has 1",
        "ddp-strong-n1-t2-g0-pp2-m1-r0": m_below_pp,
        "ddp-strong-n1-t2-g0-tp2-pp2-m1-r0": m_below_pp,
        "ddp-strong-n1-t2-g0-tp2-pp2-m2-r0": "tp x pp = 2 x 2 needs a multiple of 4 ranks; "
        "this point has 2",
        "ddp-strong-n1-t2-g0-tp2-pp2-m8-r0": "tp x pp = 2 x 2 needs a multiple of 4 ranks; "
        "this point has 2",
        "ddp-strong-n1-t4-g0-pp2-m1-r0": m_below_pp,
        # dp 2 splits 24 into 12 per pipeline: 8 micro-batches do not split it (at 2 ranks,
        # dp 1, and at tp 2 x pp 2, dp 1, the pipeline's batch is 24: they do)
        "ddp-strong-n1-t4-g0-pp2-m8-r0": "8 micro-batches do not split the pipeline's batch "
        "of 12 evenly",
        "ddp-strong-n1-t4-g0-tp2-pp2-m1-r0": m_below_pp,
    }
    assert {s.knob for s in skipped if "micro-batches" in s.reason} == {"sweep.microbatches"}


def test_a_pipeline_point_runs_with_its_knobs():
    cfg = study_config.validate(_gpt(pp=[1, 2], microbatches=[4], schedule=["gpipe"]))
    point = study_plan.find(cfg, "ddp-strong-n1-t2-g0-pp2-m4-gpipe-r0")
    rc = launcher.run_config(cfg, point, "DATA")
    assert (rc["dist"]["pp"], rc["dist"]["microbatches"], rc["dist"]["schedule"]) == (
        2,
        4,
        "gpipe",
    )
    spec = launcher.job_spec(cfg, point.run_id, "DATA")
    assert (spec["point"]["pp"], spec["point"]["microbatches"]) == (2, 4)
    plain = study_plan.find(cfg, "ddp-strong-n1-t2-g0-r0")  # pp=1: no micro-batches
    assert "microbatches" not in launcher.run_config(cfg, plain, "DATA")["dist"]
    dims = study_plan.point_layout(cfg, point)
    assert (dims.pp, dims.dp, dims.pipe.m, dims.pipe.schedule) == (2, 1, 4, "gpipe")


def test_layers_that_pp_times_v_do_not_split_are_skipped():
    """The tiny GPT's 2 layers: interleaving 2 stages per rank over pp 2 needs 4."""
    cfg = _gpt("tiny", pp=[1, 2], schedule=["1f1b", "interleaved-1f1b"])
    cfg["train"]["dist"] = {"virtual_stages": 2}
    points, skipped = study_plan.plan(study_config.validate(cfg))
    assert all(p.pp == 1 for p in points)
    why = {s.point.run_id: s.reason for s in skipped}
    assert why["ddp-strong-n1-t2-g0-pp2-interleaved-1f1b-r0"] == (
        "the model's 2 layers do not split over pp x v = 2 x 2 = 4 stages"
    )
    assert why["ddp-strong-n1-t2-g0-pp2-1f1b-r0"] == "schedule 1f1b runs 1 stage(s) per rank, not 2"
    # the mini GPT's 4 layers split over 4 stages
    cfg["train"]["model"]["options"] = {"size": "mini"}
    points, _ = study_plan.plan(study_config.validate(cfg))
    assert "ddp-strong-n1-t2-g0-pp2-interleaved-1f1b-r0" in [p.run_id for p in points]


def test_a_cnn_sweep_skips_every_pipeline_point():
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweep"]["pp"] = [1, 2]
    points, skipped = study_plan.plan(study_config.validate(cfg))
    plain = study_plan.plan(study_config.validate(copy.deepcopy(DEFAULT))).points
    assert points == plain  # every pp=1 point, nothing else
    assert skipped and all(s.point.pp == 2 and s.knob == "sweep.pp" for s in skipped)
    for s in skipped:  # the reason the backend gives first, else the model's
        if s.point.backend == "horovod":
            assert s.reason == (
                "pipeline parallelism (pp=2) needs a torch.distributed backend, not horovod"
            )
        else:
            assert "model 'cnn' does not split into pipeline stages" in s.reason


# --------------------------------------------------------------------------- explicit points


def _explicit(dist: dict, tasks: list[int] | None = None) -> dict:
    cfg = _gpt("mini", tasks_per_node=tasks or [2])
    cfg["train"]["dist"] = dist
    return cfg


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (
            lambda: {**copy.deepcopy(DEFAULT), "train": {**DEFAULT["train"], "dist": {"pp": 2}}},
            "sweep point ddp-strong-n1-t1-g0-r0: field 'train.dist.pp': model 'cnn' does not "
            "split into pipeline stages",
        ),
        (
            lambda: _explicit({"pp": 2, "microbatches": 1}),
            "sweep point ddp-strong-n1-t2-g0-r0: field 'train.dist.microbatches': schedule "
            "1f1b needs m >= pp = 2 micro-batches, not 1",
        ),
        (
            lambda: _explicit({"pp": 2, "microbatches": 3}),
            "sweep point ddp-strong-n1-t2-g0-r0: field 'train.dist.microbatches': 3 "
            "micro-batches do not split the pipeline's batch of 32 evenly",
        ),
        (
            lambda: _explicit({"pp": 8}, tasks=[8]),
            "sweep point ddp-strong-n1-t8-g0-r0: field 'train.dist.pp': the model's 4 layers "
            "do not split over pp x v = 8 x 1 = 8 stages",
        ),
        (
            lambda: (
                _gpt(pp=[1, 2]) | {"train": _with(_gpt()["train"], "optim", grad_accum_steps=2)}
            ),
            "sweep point ddp-strong-n1-t2-g0-pp2-r0: field 'train.optim.grad_accum_steps': "
            "2 accumulation steps with pipeline parallelism (pp=2)",
        ),
        (
            lambda: _gpt(pp=[1, 2]) | {"train": _with(_gpt()["train"], "dist", pp=2)},
            "config: train.dist.pp: set by the workflow from sweep.pp; remove it here",
        ),
        (
            lambda: _gpt(microbatches=[2, 4]),
            "config: sweep.microbatches: applies to pipelines, and no point has one",
        ),
        (
            lambda: {**copy.deepcopy(DEFAULT), "sweep": {**DEFAULT["sweep"], "pp": [2]}},
            "config: sweep.pp: no point of the sweep can run; ddp-strong-n1-t1-g0-pp2-r0: "
            "model 'cnn' does not split into pipeline stages",
        ),
    ],
    ids=[
        "cnn",
        "m-below-pp",
        "batch",
        "layers",
        "grad-accum",
        "owned",
        "microbatches-alone",
        "nothing-left",
    ],
)
def test_an_impossible_point_written_explicitly_is_one_error_line(cfg, expected):
    assert expected in _error(cfg())


def _with(section: dict, key: str, **values) -> dict:
    out = copy.deepcopy(section)
    out.setdefault(key, {}).update(values)
    return out


def test_a_skipped_pipeline_point_asked_for_by_name_is_an_error():
    cfg = study_config.validate(_gpt(pp=[1, 2], tasks_per_node=[1, 2]))
    with pytest.raises(UsageError, match="sweep.pp: this combination cannot exist"):
        study_plan.find(cfg, "ddp-strong-n1-t1-g0-pp2-r0")


def test_the_trainers_batch_rule_refuses_accumulation_and_an_uneven_split():
    """What the trainer asks (resolve_batch on the run config's layout), without a study."""
    rc = from_dict({"dist": {"pp": 2, "microbatches": 4}})  # global batch 256
    for world in (2, 4, 16):
        dims = ParallelDims.from_dist(world, rc.dist)
        assert dims.dp == world // 2
        assert resolve_batch(rc, dims).per_rank_batch == 256 // dims.dp
    uneven = from_dict({"dist": {"pp": 2, "microbatches": 3}, "optim": {"global_batch_size": 8}})
    with pytest.raises(UsageError, match=r"^field 'dist.microbatches': 3 micro-batches"):
        resolve_batch(uneven, ParallelDims.from_dist(2, uneven.dist))
    accum = from_dict({"dist": {"pp": 2}, "optim": {"grad_accum_steps": 2}})
    with pytest.raises(UsageError, match=r"^field 'optim.grad_accum_steps': 2 accumulation"):
        resolve_batch(accum, ParallelDims.from_dist(2, accum.dist))
    no_pipe = from_dict({"optim": {"grad_accum_steps": 2}})
    assert resolve_batch(no_pipe, ParallelDims.from_dist(2, no_pipe.dist)).accum_steps == 2


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shipped_configs_plan_as_before(path, tmp_path):
    """pp defaults to [1]: the same points, the same skips, run ids without a pipeline
    (.test/sharding.yaml, which sweeps pp on purpose, is compared without its pp list)."""
    cfg = _shipped(path, tmp_path)
    cfg["sweep"].pop("pp", None)
    points, skipped = study_plan.plan(study_config.validate(copy.deepcopy(cfg)))
    cfg["sweep"]["pp"] = [1]
    explicit = study_plan.plan(study_config.validate(cfg))
    assert [p.run_id for p in points] == [p.run_id for p in explicit.points]
    assert [(s.point.run_id, s.reason) for s in skipped] == [
        (s.point.run_id, s.reason) for s in explicit.skipped
    ]
    assert all(p.pp == 1 and p.microbatches is None and "-pp" not in p.run_id for p in points)


def test_a_point_without_a_pipeline_keeps_its_job_spec():
    """The job spec (and so the run directory's config digest) of a pp = 1 point carries
    no pipeline field: a finished run of an earlier version is not trained again."""
    cfg = study_config.validate(yaml.safe_load((REPO / ".test" / "config.yaml").read_text()))
    point = study_plan.expand(cfg)[0]
    assert set(launcher.job_spec(cfg, point.run_id, "DATA")["point"]) == {
        "run_id",
        "ranks",
        "backend",
        "mode",
        "nodes",
        "tasks_per_node",
        "gpus_per_task",
        "repeat",
        "tp",
    }
    listed = study_plan.plan(cfg).as_dict()["runs"][0]  # the plan lists every field
    assert (listed["pp"], listed["microbatches"], listed["schedule"]) == (1, None, None)


# --------------------------------------------------------------------------- scalelab plan


def test_plan_text_and_json_show_the_pipeline(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "pp.yaml"
    config.write_text(yaml.safe_dump(_gpt(pp=[1, 2], microbatches=[1, 4], tasks_per_node=[2])))
    assert cli.main(["plan", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep: 2 training run(s); 1 combination(s) skipped, they cannot exist:"
    assert (
        "  skipped ddp-strong-n1-t2-g0-pp2-m1-r0: schedule 1f1b needs m >= pp = 2 "
        "micro-batches, not 1" in lines
    )
    bubble = bubble_fraction(2, 1, 4)
    assert (
        f"  run ddp-strong-n1-t2-g0-pp2-m4-r0: 2 rank(s), pp 2, 1f1b, m 4, bubble {bubble:.3g}"
        in (lines)
    )
    assert cli.main(["plan", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, PLAN_SCHEMA)
    run = doc["runs"][1]
    assert (run["run_id"], run["pp"], run["microbatches"], run["schedule"]) == (
        "ddp-strong-n1-t2-g0-pp2-m4-r0",
        2,
        4,
        None,
    )
    (skip,) = doc["skipped"]
    assert (skip["pp"], skip["microbatches"], skip["knob"]) == (2, 1, "sweep.microbatches")


# --------------------------------------------------------------------------- the analysis


def _run(
    root: Path, run_id: str, ranks: int, tput: float, summary_extra: dict | None = None, **pipe
) -> None:
    """A hand-written run directory; ``pipe``: the run config's dist fields; a pipeline's
    stage holds 1/pp of the state and keeps 48 activation bytes (64 without stages)."""
    d = root / run_id
    d.mkdir(parents=True)
    summary = {
        "world_size": ranks,
        "samples_per_s": tput,
        "global_batch_size": 32,
        "steps_per_epoch": 8,
        "backend": "ddp",
        "rank0_param_bytes": 8 // pipe.get("pp", 1),
        "rank0_grad_bytes": 8 // pipe.get("pp", 1),
        "rank0_optim_state_bytes": 16 // pipe.get("pp", 1),
        "rank0_state_bytes": 32 // pipe.get("pp", 1),
        "rank0_activation_peak_bytes": 48 if pipe.get("pp", 1) > 1 else 64,
        **(summary_extra or {}),
    }
    (d / "summary.json").write_text(json.dumps(summary))
    dist = {"pp": 1, "microbatches": None, "virtual_stages": 1, "schedule": "1f1b", **pipe}
    (d / "config.yaml").write_text(yaml.safe_dump({"dist": dist}))
    (d / "sweep.json").write_text(
        json.dumps({"run_id": run_id, "backend": "ddp", "mode": "strong", "nodes": 1})
    )


@pytest.fixture
def pipeline_study(tmp_path):
    _run(tmp_path, "dp-2", 2, 200.0)
    _run(tmp_path, "dp-4", 4, 380.0)
    _run(tmp_path, "pp2-m2-2", 2, 120.0, pp=2, microbatches=2)
    _run(tmp_path, "pp2-m2-4", 4, 230.0, pp=2, microbatches=2)
    _run(tmp_path, "pp2-m4-4", 4, 300.0, pp=2, microbatches=4)
    _run(tmp_path, "pp2-default-4", 4, 210.0, pp=2, schedule="gpipe")  # m: the default, pp
    _run(  # the 1f1b m=2 point at 4 ranks again, recomputing: its own series
        tmp_path,
        "pp2-m2-4-rc",
        4,
        184.0,
        {"activation_checkpointing": True, "rank0_activation_peak_bytes": 16},
        pp=2,
        microbatches=2,
    )
    _run(
        tmp_path,
        "pp2-v2-4",
        4,
        320.0,
        pp=2,
        microbatches=4,
        virtual_stages=2,
        schedule="interleaved-1f1b",
    )
    frame = runs.to_frame(runs.load_runs([tmp_path]))
    return frame, *scaling.analyse(frame)


def test_runs_table_has_the_pipeline_columns(pipeline_study):
    frame, _, _ = pipeline_study
    row = frame.set_index("run_id")
    assert list(columns.COLUMNS)[list(columns.COLUMNS).index("tp") + 1 :][:4] == [
        "pp",
        "microbatches",
        "schedule",
        "bubble",
    ]
    assert (row.loc["dp-2", "pp"], row.loc["dp-2", "bubble"]) == (1, 0)
    assert row.loc["dp-2", "schedule"] == columns.NO_SCHEDULE
    assert row.loc["pp2-m2-2", "bubble"] == pytest.approx(bubble_fraction(2, 1, 2))
    assert row.loc["pp2-m4-4", "bubble"] == pytest.approx(bubble_fraction(2, 1, 4))
    assert row.loc["pp2-v2-4", "bubble"] == pytest.approx(bubble_fraction(2, 2, 4))
    assert row.loc["pp2-default-4", "microbatches"] == 2  # DistConfig.m: pp
    assert row.loc["pp2-m4-4", "schedule"] == "1f1b"


def test_the_trainers_bubble_and_pipeline_win_over_the_config(tmp_path):
    _run(tmp_path, "r", 2, 100.0, pp=2, microbatches=2)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    summary.update(pp=2, microbatches=8, schedule="gpipe", bubble=0.2)
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    (row,) = runs.load_runs([tmp_path])
    assert (row["microbatches"], row["schedule"], row["bubble"]) == (8, "gpipe", 0.2)


def test_each_pipeline_is_its_own_series(pipeline_study):
    _, table, fits = pipeline_study
    at = table.set_index(["pp", "microbatches", "schedule", "recompute", "ranks"])
    assert at.loc[(2, 2, "1f1b", False, 4), "speedup"] == pytest.approx(230 / 120)
    assert at.loc[(1, 1, columns.NO_SCHEDULE, False, 4), "speedup"] == pytest.approx(380 / 200)
    assert at.loc[(2, 2, "1f1b", False, 4), "bubble"] == pytest.approx(bubble_fraction(2, 1, 2))
    assert at.loc[(2, 4, "interleaved-1f1b", False, 4), "bubble"] == pytest.approx(
        bubble_fraction(2, 2, 4)
    )
    # recomputing at 4 ranks only: its own series, its own baseline
    assert at.loc[(2, 2, "1f1b", True, 4), "speedup"] == pytest.approx(1.0)
    assert len(fits) == len(table.groupby(scaling.GROUP))


def test_report_shows_pipeline_columns_and_memory(pipeline_study):
    _, table, fits = pipeline_study
    md = report.markdown(table, fits, 0.7, ["runs"])
    header = next(line for line in md.splitlines() if line.startswith("| source |"))
    assert "| tp | pp | m | schedule | bubble | recompute | nodes |" in header
    memory = report_sections.memory_comparisons(table)
    assert any(  # each stage holds half the layers' state
        c["pp"] == 2 and c["microbatches"] == 4 and c["ratio"] == pytest.approx(0.5) for c in memory
    )
    plain = table[table["pp"] == 1]
    md = report.markdown(plain, scaling.fit_models(plain, 0.7), 0.7, ["runs"])
    assert "| schedule |" not in md and "bubble" not in md  # no pipeline: as before


def test_csv_rows_carry_the_pipeline(tmp_path):
    csv = tmp_path / "pp.csv"
    csv.write_text("gpus,throughput,pp,microbatches\n2,100,2,4\n4,190,2,4\n4,170,1,\n")
    rows = runs_csv.load_csv(csv)
    assert [(r["pp"], r["microbatches"], r["schedule"]) for r in rows] == [
        (2, 4, "1f1b"),
        (2, 4, "1f1b"),
        (1, 1, columns.NO_SCHEDULE),
    ]
    assert rows[0]["bubble"] == pytest.approx(bubble_fraction(2, 1, 4))
    bad = tmp_path / "bad.csv"
    bad.write_text("gpus,throughput,pp\n2,100,1.5\n")
    with pytest.raises(UsageError, match="pp: expected a whole number"):
        runs_csv.load_csv(bad)


def test_a_pipeline_plan_imports_no_torch(tmp_path):
    """Snakemake plans inside every job: the pipeline rules and the batch rule are torch-free."""
    config = tmp_path / "pp.yaml"
    config.write_text(yaml.safe_dump(_gpt(pp=[1, 2], microbatches=[2, 3], tp=[1, 2])))
    code = (
        "import sys, yaml\n"
        "from scalelab.study import config, plan\n"
        "cfg = config.validate(yaml.safe_load(open(sys.argv[1])))\n"
        "assert plan.plan(cfg).skipped\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_memory_falls_with_pp_and_recomputation_is_measured(pipeline_study, tmp_path):
    frame, table, fits = pipeline_study
    row = frame.set_index("run_id")
    assert row.loc["pp2-m2-4-rc", "recompute"] and not row.loc["pp2-m2-4", "recompute"]
    assert row.loc["pp2-m2-4-rc", "activation_bytes_per_rank"] == 16
    at = table.set_index(["pp", "microbatches", "schedule", "recompute", "ranks"])
    assert (
        at.loc[(2, 2, "1f1b", False, 4), "state_bytes_per_rank"]
        < at.loc[(1, 1, columns.NO_SCHEDULE, False, 4), "state_bytes_per_rank"]
    )
    (saved,) = report_sections.recompute_comparisons(table)
    assert (saved["pp"], saved["ranks"], saved["without_bytes_per_rank"]) == (2, 4, 48)
    assert saved["throughput_ratio"] == pytest.approx(184 / 230)
    md = report.markdown(table, fits, 0.7, ["runs"])
    assert (
        "What activation recomputation saved: ddp pp=2 m=2 at 4 ranks keeps 0.33x "
        "(1.53e-05 vs 4.58e-05 MiB) at 0.80x the throughput" in md
    )
    memory_header = next(line for line in md.splitlines() if "params MiB/rank" in line)
    assert "| recompute |" in memory_header and "activations MiB/rank" in memory_header
    out = report.write(tmp_path / "analysis", frame, table, fits, 0.7, ["runs"])
    written = json.loads((out / "analysis.json").read_text())
    assert written["recompute"] == [saved] and written["recompute_sentence"] in md
    back = pd.read_csv(out / "runs.csv").set_index("run_id")  # a CSV keeps the pipeline
    assert (
        back.loc["dp-2", "schedule"] == columns.NO_SCHEDULE and back.loc["pp2-m2-4-rc", "recompute"]
    )


def test_a_pipelines_recomputation_is_read_from_its_run_config(tmp_path):
    _run(tmp_path, "r", 2, 100.0, pp=2, activation_checkpointing=True)
    _run(tmp_path, "dp", 2, 100.0, activation_checkpointing=True)  # no pipeline: not applied
    rows = {r["run_id"]: r for r in runs.load_runs([tmp_path])}
    assert rows["r"]["recompute"] is True and rows["dp"]["recompute"] is False
