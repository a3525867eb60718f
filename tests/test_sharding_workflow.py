"""Issues 18 and 27 through the workflow: the sweep's ``tp`` and ``pp`` knobs, the skipped
combinations, the tokens source without staging, and the memory and bubble figures of the
analysis, on a real sweep of ``backends: [ddp, fsdp]`` x ``tp: [1, 2]`` x ``pp: [1, 2]``
(.test/sharding.yaml) run locally and under ``--profile slurm`` on the test cluster.

The plan-time checks run in-process through ``study_config.validate`` (what common.smk calls);
the two workflow runs share one local reference (a session fixture).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, two_nodes
from test_workflow import copy_workflow, snakemake

from scalelab import launcher
from scalelab.comm import predict
from scalelab.errors import UsageError
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan

CONFIG = yaml.safe_load((REPO / ".test" / "sharding.yaml").read_text())
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

#: The issue's acceptance: fsdp at 2 ranks holds at most this share of DDP's
#: parameter + optimizer-state bytes per rank.
FSDP_SHARE = 0.55
#: Final weights of every run against the 1-rank ddp run (SGD, deterministic, CPU):
#: reduction order differs, the computation does not.
ATOL = 1e-5
RUNS = [
    "ddp-strong-n1-t1-g0-r0",
    "ddp-strong-n1-t2-g0-pp2-r0",
    "ddp-strong-n1-t2-g0-r0",
    "ddp-strong-n1-t2-g0-tp2-r0",
    "fsdp-strong-n1-t1-g0-r0",
    "fsdp-strong-n1-t2-g0-pp2-r0",
    "fsdp-strong-n1-t2-g0-r0",
    "fsdp-strong-n1-t2-g0-tp2-r0",
]
#: The skipped combinations of .test/sharding.yaml: tp or pp at 1 rank, tp x pp at 2.
SKIPPED = sorted(
    f"{b}-strong-n1-t{t}-g0-{layout}-r0"
    for b in ("ddp", "fsdp")
    for t, layout in ((1, "pp2"), (1, "tp2"), (1, "tp2-pp2"), (2, "tp2-pp2"))
)


def _cfg(**sweep_lists) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg["sweep"].update(sweep_lists)
    return cfg


def _error(cfg: dict) -> str:
    with pytest.raises(UsageError) as err:
        study_config.validate(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------- plan time


def test_tp_1_keeps_todays_run_ids():
    plain = study_config.validate(copy.deepcopy(DEFAULT))
    explicit = copy.deepcopy(DEFAULT)
    explicit["sweep"]["tp"] = [1]
    ids = [p.run_id for p in study_plan.expand(plain)]
    assert ids == [p.run_id for p in study_plan.expand(study_config.validate(explicit))]
    assert all("tp" not in i for i in ids) and ids[0] == "ddp-strong-n1-t1-g0-r0"


def test_impossible_combinations_are_skipped_and_listed():
    cfg = study_config.validate(_cfg(backends=["ddp", "horovod", "fsdp"], pp=[1]))
    points, skipped = study_plan.plan(cfg)
    assert [p.run_id for p in points] == [  # the lists' order; tp before repeats
        "ddp-strong-n1-t1-g0-r0",
        "ddp-strong-n1-t2-g0-r0",
        "ddp-strong-n1-t2-g0-tp2-r0",
        "horovod-strong-n1-t1-g0-r0",
        "horovod-strong-n1-t2-g0-r0",
        "fsdp-strong-n1-t1-g0-r0",
        "fsdp-strong-n1-t2-g0-r0",
        "fsdp-strong-n1-t2-g0-tp2-r0",
    ]
    why = {s.point.run_id: s.reason for s in skipped}
    assert sorted(why) == [
        "ddp-strong-n1-t1-g0-tp2-r0",
        "fsdp-strong-n1-t1-g0-tp2-r0",
        "horovod-strong-n1-t1-g0-tp2-r0",
        "horovod-strong-n1-t2-g0-tp2-r0",
    ]
    assert "multiple of 2 ranks" in why["ddp-strong-n1-t1-g0-tp2-r0"]
    assert "horovod" in why["horovod-strong-n1-t2-g0-tp2-r0"]
    summary = study_plan.plan_summary(cfg)
    assert summary.startswith("sweep: 8 training run(s); 4 combination(s) skipped")
    assert all(f"skipped {r}:" in summary for r in why)
    # the run config of a tp point carries it; the tokens source is not staged
    point = study_plan.find(cfg, "fsdp-strong-n1-t2-g0-tp2-r0")
    rc = launcher.run_config(cfg, point, "DATA")
    assert rc["dist"]["tp"] == 2 and rc["dist"]["backend"] == "fsdp"
    assert rc["data"]["source"] == "tokens" and "path" not in rc["data"]
    assert launcher.job_spec(cfg, point.run_id, "DATA")["point"]["tp"] == 2


def test_model_without_tensor_parallel_plan_is_skipped():
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweep"].update(backends=["ddp"], tp=[1, 2])
    points, skipped = study_plan.plan(study_config.validate(cfg))
    assert [p.tp for p in points] == [1] * len(points)
    assert {s.point.tasks_per_node for s in skipped} == {1, 2}
    assert "model 'cnn' has no tensor-parallel plan" in skipped[-1].reason


def test_heads_that_do_not_split_are_skipped_at_plan_time():
    """A GPT whose heads do not divide by tp: skipped when the plan is built (not found
    only when the job starts), the rest of the sweep runs."""
    cfg = copy.deepcopy(CONFIG)
    cfg["train"]["model"].setdefault("options", {})["n_heads"] = 1
    cfg["train"]["model"]["options"]["d_model"] = 32
    points, skipped = study_plan.plan(study_config.validate(cfg))
    assert points and all(p.tp == 1 for p in points)
    two_ranks = [s for s in skipped if s.point.tasks_per_node == 2 and s.point.pp == 1]
    assert two_ranks and all("1 heads do not split over tp=2" in s.reason for s in two_ranks)


def _explicit_tp(cfg: dict, backend: str) -> None:
    """tp written in the run config (no sweep.tp): every point of the sweep uses it."""
    del cfg["sweep"]["tp"]
    cfg["sweep"].update(backends=[backend], tasks_per_node=[2])
    cfg["train"].setdefault("dist", {})["tp"] = 2


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # the explicit single point: nothing left to run
        (
            lambda c: c["sweep"].update(backends=["horovod"], tp=[2]),
            "config: sweep.tp: no point of the sweep can run; horovod-strong-n1-t1-g0-tp2-r0",
        ),
        # written in the run config (no sweep.tp): an error naming the field, not a skip
        (
            lambda c: _explicit_tp(c, "horovod"),
            "sweep point horovod-strong-n1-t2-g0-r0: field 'train.dist.tp': tensor parallelism",
        ),
        (
            lambda c: c["train"].setdefault("dist", {}).update(tp=2),
            "config: train.dist.tp: set by the workflow from sweep.tp",
        ),
        (
            lambda c: c["data"].update(node_local=True),
            "config: data.node_local: not used by source 'tokens'",
        ),
    ],
)
def test_impossible_point_written_explicitly_is_an_error(mutate, expected):
    cfg = copy.deepcopy(CONFIG)
    mutate(cfg)
    assert expected in _error(cfg)


def test_plan_printed_without_snakemake(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(REPO / ".test" / "sharding.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "sweep: 8 training run(s); 8 combination(s) skipped, they cannot exist:"
    assert (
        "  skipped ddp-strong-n1-t1-g0-tp2-r0: tp=2 needs a multiple of 2 ranks; this "
        "point has 1" in lines
    )
    assert "  run fsdp-strong-n1-t2-g0-tp2-r0: 2 rank(s), tp=2" in lines
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_cfg(backends=["horovod"], tp=[2])))
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "sweep.tp: no point of the sweep can run" in proc.stderr


def test_a_skipped_run_id_asked_for_by_name_is_an_error():
    cfg = study_config.validate(copy.deepcopy(CONFIG))
    with pytest.raises(UsageError, match="sweep.tp: this combination cannot exist"):
        study_plan.find(cfg, "ddp-strong-n1-t1-g0-tp2-r0")


# --------------------------------------------------------------------------- workflow runs


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="session")
def local_study(tmp_path_factory):
    """.test/sharding.yaml run by `snakemake` on this machine (mpirun): the reference."""
    wd = copy_workflow(tmp_path_factory.mktemp("sharding") / "wf")
    proc = snakemake(wd, ["--cores", "2", "--configfile", ".test/sharding.yaml"], timeout=1500)
    return wd, proc


def test_local_sweep_of_ddp_fsdp_and_tp(local_study):
    wd, proc = local_study
    res = wd / "results"
    assert sorted(p.name for p in (res / "runs").iterdir()) == RUNS
    assert not (res / "data").exists()  # tokens: nothing staged
    # the skipped combinations, said when the workflow starts and listed in sweep.json
    assert "8 combination(s) skipped" in proc.stderr
    plan = json.loads((res / "sweep.json").read_text())
    assert sorted(s["run_id"] for s in plan["skipped"]) == SKIPPED
    assert sorted(r["run_id"] for r in plan["runs"]) == RUNS
    ref = _weights(res / "runs" / RUNS[0])
    for run in RUNS:
        summary = json.loads((res / "runs" / run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["backend"] == run.split("-")[0]
        assert summary["world_size"] == int(run.split("-t")[1][0])
        assert summary.get("tp", 1) == (2 if "-tp2-" in run else 1)
        assert summary["pp"] == (2 if "-pp2-" in run else 1)
        if "-pp2-" in run:  # m = pp = 2: the bubble (pp - 1) / m, each stage measured
            assert (summary["microbatches"], summary["bubble"]) == (2, 0.5)
            assert len(summary["per_stage"]) == 2
        assert summary["rank0_state_bytes"] > 0
        # a generated test split: scored per token, with perplexity
        ev = json.loads((res / "runs" / run / "evaluation.json").read_text())
        assert ev["source"] == "tokens" and ev["perplexity"] > 1, ev
        assert _max_diff(_weights(res / "runs" / run), ref) < ATOL, run
        # predict's model of the run: its backend, tp and the bytes the rank really holds
        comm = predict.comm_model_from_run(res / "runs" / run)
        assert (comm.backend, comm.tp) == (summary["backend"], summary.get("tp", 1))
        assert comm.grad_bytes == summary["grad_bytes"]
        if "-tp2-" in run and run.startswith("ddp"):
            assert comm.local_bytes == summary["rank0_param_bytes"]  # measured to_local()
        if run.startswith("fsdp") and "-t2-" in run and "-pp2-" not in run:
            dp = summary["world_size"] // comm.tp
            assert sum(comm.group_bytes) / dp == pytest.approx(
                summary["rank0_param_bytes"], rel=0.01
            )  # shards: padding aside


def test_analysis_carries_tp_and_shows_what_sharding_bought(local_study):
    wd, _ = local_study
    out = wd / "results" / "analysis"
    table = pd.read_csv(out / "scaling.csv")
    for col in (
        "tp",
        "param_bytes_per_rank",
        "grad_bytes_per_rank",
        "optim_state_bytes_per_rank",
        "state_bytes_per_rank",
        "memory_vs_ddp",
        "test_perplexity",
    ):
        assert col in table.columns, col
    assert (table["test_perplexity"] > 1).all()  # every run was evaluated on its test split
    # a tp=2 or pp=2 point is its own series (its own baseline: efficiency 1 at its
    # smallest point)
    series = table.groupby(["backend", "tp", "pp"])["ranks"].apply(sorted).to_dict()
    assert series == {
        (b, tp, pp): ([1, 2] if tp == pp == 1 else [2])
        for b in ("ddp", "fsdp")
        for tp, pp in ((1, 1), (2, 1), (1, 2))
    }
    # the pipeline points: their bubble, and each stage keeps fewer activations than the
    # whole model does for the same batch (one rank; a dp=2 rank reads half the batch)
    pipes = table[table["pp"] == 2]
    assert list(pipes["bubble"]) == [0.5, 0.5] and (pipes["samples_per_s"] > 0).all()
    whole = table[(table["pp"] == 1) & (table["tp"] == 1) & (table["ranks"] == 1)]
    for backend in ("ddp", "fsdp"):
        pipe = pipes[pipes["backend"] == backend]["activation_bytes_per_rank"].iloc[0]
        assert pipe < whole[whole["backend"] == backend]["activation_bytes_per_rank"].iloc[0]
    at = table[table["pp"] == 1].set_index(["backend", "tp", "ranks"])
    ddp, fsdp = at.loc[("ddp", 1, 2)], at.loc[("fsdp", 1, 2)]
    share = (fsdp["param_bytes_per_rank"] + fsdp["optim_state_bytes_per_rank"]) / (
        ddp["param_bytes_per_rank"] + ddp["optim_state_bytes_per_rank"]
    )
    assert share <= FSDP_SHARE, share  # the acceptance line
    assert fsdp["memory_vs_ddp"] == pytest.approx(share)
    # at 1 rank fsdp shards nothing: the same bytes as ddp (the ratio is measured, not assumed)
    assert at.loc[("fsdp", 1, 1), "state_bytes_per_rank"] == pytest.approx(
        at.loc[("ddp", 1, 1), "state_bytes_per_rank"], rel=0.01
    )
    md = (out / "scaling.md").read_text()
    assert "test ppl" in md
    header = next(line for line in md.splitlines() if "| tp |" in line)
    assert "| pp |" in header and "bubble" in header
    sentence = next(line for line in md.splitlines() if line.startswith("What sharding bought"))
    assert f"fsdp at 2 ranks holds {share:.2f}x of ddp's parameter + optimizer-state" in sentence
    doc = json.loads((out / "analysis.json").read_text())
    found = {(c["backend"], c["tp"], c["pp"]): c["ratio"] for c in doc["memory_vs_ddp"]}
    assert found[("fsdp", 1.0, 1.0)] == pytest.approx(share) and ("ddp", 2.0, 1.0) in found
    # per-rank memory falls with pp: a stage holds about half the parameters and state
    assert found[("ddp", 1.0, 2.0)] < 0.6 and found[("fsdp", 1.0, 2.0)] < 0.6
    assert (out / "plots" / "memory.png").stat().st_size > 10_000


def test_slurm_profile_sweep_matches_local(cluster, local_study):
    """The same sweep, one rank per node: the 2-rank points span 2 Slurm nodes."""
    local, _ = local_study
    cfg = copy.deepcopy(CONFIG)
    cfg["sweep"].update(nodes=[1, 2], tasks_per_node=[1])
    wd = copy_workflow(cluster.shared_dir / f"wf-sharding-{local.parent.name}")
    (wd / "two.yaml").write_text(yaml.safe_dump(cfg))
    env = cluster.env()
    before = set(
        subprocess.run(
            ["squeue", "--states=all", "-h", "-o", "%i"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    proc = snakemake(
        wd,
        [
            "--profile",
            "slurm",
            "--configfile",
            "two.yaml",
            "--slurm-init-seconds-before-status-checks",
            "3",
        ],
        env=env,
        timeout=1500,
    )
    assert "8 combination(s) skipped" in proc.stderr
    srun = shutil.which("srun", path=env["PATH"]) or "srun"
    for run in RUNS:
        # same computation, other layout: n1-t2 here is n2-t1 there
        there = run.replace("n1-t2", "n2-t1")
        run_dir = wd / "results" / "runs" / there
        info = json.loads((run_dir / "run_info.json").read_text())
        assert info["layout"]["launcher"] == "slurm"
        if "n2-t1" in there:
            assert two_nodes(info["hostnames"]), info
            log = (wd / "logs" / "train" / f"{there}.log").read_text().replace(srun, "srun")
            assert "srun --mpi=pmix --nodes=2 --ntasks=2" in log
        assert _max_diff(_weights(run_dir), _weights(local / "results" / "runs" / run)) < ATOL
    jobs = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%T|%D|%k"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    rows = [j.split("|") for j in jobs if j.split("|")[0] not in before]
    train = [r for r in rows if r[3].startswith("rule_train")]
    assert sorted(int(r[2]) for r in train) == [1, 1, 2, 2, 2, 2, 2, 2], rows
    assert all(state == "COMPLETED" for _, state, _, _ in rows), rows
    table = pd.read_csv(wd / "results" / "analysis" / "scaling.csv").set_index(
        ["backend", "tp", "pp", "ranks"]
    )
    assert table.loc[("fsdp", 1, 1, 2), "memory_vs_ddp"] <= FSDP_SHARE
    assert table.loc[("ddp", 1, 2, 2), "bubble"] == 0.5  # one stage per node
