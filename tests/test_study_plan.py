"""The study's plan (issue 25): `scalelab plan` of every shipped config, its --json schema,
the untimed-point refusal, no torch at plan time, one plan per parse, and the generated
workflow schema."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO

from scalelab import cli, launcher
from scalelab.errors import UsageError
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan
from scalelab.study import slurm as study_slurm

SHIPPED = sorted([*REPO.glob("config/*.yaml"), *REPO.glob(".test/*.yaml")])
PLAN_SCHEMA = json.loads((REPO / "src" / "scalelab" / "schemas" / "plan.schema.json").read_text())


def _shipped(path: Path, tmp_path: Path) -> Path:
    """The shipped config, with a data.path that exists here (an imagefolder config names
    the site's dataset)."""
    cfg = yaml.safe_load(path.read_text())
    if cfg["data"].get("path"):
        (tmp_path / "images").mkdir()
        cfg["data"]["path"] = str(tmp_path / "images")
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(cfg))
    return out


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_shipped_config_is_covered():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"config/config.yaml", ".test/config.yaml", ".test/sharding.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_plan_of_a_shipped_config_lists_points_and_skips(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _shipped(path, tmp_path)
    cfg = study_config.load(config)
    points, skipped = study_plan.plan(cfg)
    code, text, err = _main(capsys, "plan", config)
    assert code == 0 and not err, err
    for point in points:
        assert f"  run {point.run_id}: {point.ranks} rank(s)" in text
    for skip in skipped:
        assert f"  skipped {skip.point.run_id}: {skip.reason}" in text
    assert text.startswith(f"sweep: {len(points)} training run(s)")
    code, doc, err = _main(capsys, "plan", config, "--json")
    assert code == 0 and not err, err
    document = json.loads(doc)
    jsonschema.validate(document, PLAN_SCHEMA)
    assert [r["run_id"] for r in document["runs"]] == [p.run_id for p in points]
    assert [(s["run_id"], s["reason"]) for s in document["skipped"]] == [
        (s.point.run_id, s.reason) for s in skipped
    ]


def test_the_sharding_config_skips_combinations_with_their_reason(capsys):
    code, doc, _ = _main(capsys, "plan", REPO / ".test" / "sharding.yaml", "--json")
    skipped = json.loads(doc)["skipped"]
    # tp or pp 2 at 1 rank, tp 2 x pp 2 at 1 and 2 ranks, for ddp and fsdp
    assert code == 0 and {s["run_id"] for s in skipped} == {
        f"{b}-strong-n1-t{t}-g0-{layout}-r0"
        for b in ("ddp", "fsdp")
        for t, layout in ((1, "pp2"), (1, "tp2"), (1, "tp2-pp2"), (2, "tp2-pp2"))
    }
    assert all(
        re.search(r"needs a multiple of [24] ranks; this point has [12]$", s["reason"])
        for s in skipped
    ), skipped


def test_plan_json_schema_refuses_a_wrong_document():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ok": True, "config": "c", "runs": [], "skipped": []}, PLAN_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"ok": True, "config": "c", "runs": [{"run_id": "x"}], "skipped": []}, PLAN_SCHEMA
        )


def test_a_bad_config_is_one_line_and_one_json_document(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"]["nodez"] = [1]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    code, out, err = _main(capsys, "plan", bad, "--json")
    assert code == 2 and err.splitlines() == [
        f"scalelab plan: error: {bad}: sweep.nodez: unknown key (did you mean 'nodes'?); "
        f"valid: backends, nodes, tasks_per_node, gpus_per_task, tp, pp, microbatches, schedule, "
        f"modes, repeats, "
        f"max_points"
    ]
    assert json.loads(out)["ok"] is False


def _weak(batch: int) -> dict:
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(modes=["weak"], tasks_per_node=[1, 2, 4, 8])
    cfg["train"]["train"]["epochs"] = 2
    cfg["train"]["optim"]["global_batch_size"] = batch
    return cfg


def test_a_weak_sweep_whose_largest_point_has_one_step_per_epoch_is_refused():
    """Part 1's weak point: one step per epoch at 8 ranks, eaten by the warm-up."""
    study_config.validate(_weak(8))  # 64 at 8 ranks: 7 steps per epoch
    with pytest.raises(UsageError) as err:  # 4 ranks: 160, 3 steps; 8 ranks: 320, 1 step
        study_config.validate(_weak(40))
    message = str(err.value)
    assert message.startswith(
        "config: sweep point ddp-weak-n1-t8-g0-r0: field "
        "'train.optim.global_batch_size': a global batch of 320 gives 1 "
        "step(s) per epoch"
    ), message
    assert "train.metrics.warmup_steps=3" in message and "\n" not in message


def test_the_warm_up_is_the_trainers():
    """A smaller warm-up times the same point: the rule reads train.metrics.warmup_steps."""
    cfg = _weak(40)
    cfg["train"]["metrics"] = {"warmup_steps": 0}
    study_config.validate(cfg)


def test_plan_imports_no_torch():
    code = (
        "import sys, yaml\n"
        "from scalelab.study import config, slurm\n"
        "for path in sys.argv[1:]:\n"
        "    cfg = config.validate(yaml.safe_load(open(path)))\n"
        "    slurm.point_resources(config.plan(cfg).points[0], cfg, 'train')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    configs = [REPO / "config" / "config.yaml", REPO / ".test" / "config.yaml"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, configs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_tensor_parallel_plan_imports_no_torch():
    """A GPT sweep with tp: the layout rule reads the heads from models.gpt_shapes."""
    code = (
        "import sys, yaml\n"
        "from scalelab.study import config\n"
        "config.validate(yaml.safe_load(open(sys.argv[1])))\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO / ".test" / "sharding.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_plan_is_computed_once_per_parse():
    """What common.smk and analyze.smk ask, and every job spec: one computed plan."""
    cfg = yaml.safe_load((REPO / ".test" / "sharding.yaml").read_text())
    cfg["train"]["seed"] = 12345  # a config no other test planned in this process
    before = study_plan.computed
    cfg = study_config.validate(cfg)
    plan = study_plan.plan(cfg)
    study_plan.plan_summary(cfg)
    study_plan.commbench_point(cfg)
    study_slurm.point_resources(plan.points[0], cfg, "train")
    for point in plan.points:
        launcher.job_spec(cfg, point.run_id, "results/data")
    assert study_plan.computed - before == 1
    changed = copy.deepcopy(cfg)
    changed["sweep"]["repeats"] = 2
    study_plan.plan(changed)
    assert study_plan.computed - before == 2  # another sweep is another plan


def test_the_workflow_schema_is_generated_from_the_models():
    committed = (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text()
    assert committed == study_config.schema_text(), "regenerate: scalelab plan --write-schema"
    schema = yaml.safe_load(committed)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in SHIPPED:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    # the container section and the schema agree: no srun keys in either
    container = schema["$defs"]["ContainerConfig"]["properties"]
    assert "srun_mpi" not in container and "srun_flags" not in container
    assert schema["properties"]["train"]["properties"].keys() >= {"optim", "model", "data"}


def test_write_schema_writes_the_study_files(tmp_path, capsys, monkeypatch):
    (tmp_path / "workflow" / "schemas").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, out, _ = _main(capsys, "plan", "--write-schema")
    assert code == 0
    written = tmp_path / "workflow" / "schemas" / "config.schema.yaml"
    assert written.read_text() == study_config.schema_text() and str(written) in out
