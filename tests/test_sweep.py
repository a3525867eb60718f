"""Workflow config validation and sweep expansion."""

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from scalelab import launcher
from scalelab.errors import UsageError
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _bad(mutate) -> str:
    cfg = copy.deepcopy(DEFAULT)
    mutate(cfg)
    with pytest.raises(UsageError) as err:
        study_config.validate(cfg)
    return str(err.value)


def test_default_config_is_valid_and_filled():
    cfg = study_config.validate(DEFAULT)
    assert cfg["resources"]["runtime"] == 60  # schema default filled in
    assert cfg["container"]["enabled"] is False
    ids = [p.run_id for p in study_plan.expand(cfg)]
    repeats = DEFAULT["sweep"].get("repeats", 1)
    assert ids == [
        f"{b}-strong-n1-t{t}-g0-r{r}"
        for b in ("ddp", "horovod")
        for t in (1, 2)
        for r in range(repeats)
    ]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(bogus=1), "config: bogus: unknown key; valid: results, data"),
        (lambda c: c["sweep"].update(nodes=[0]), "config: sweep.nodes[0]: must be >= 1, got 0"),
        (lambda c: c["sweep"].update(nodes=[-2]), "sweep.nodes[0]"),
        (
            lambda c: c["sweep"].update(nodes=["two"]),
            "sweep.nodes[0]: expected an integer, got 'two'",
        ),
        (
            lambda c: c["sweep"].update(backends=["mpi"]),
            "sweep.backends[0]: expected one of 'ddp', 'horovod', 'none' or 'fsdp', got 'mpi'",
        ),
        (
            lambda c: (
                c["sweep"].update(tasks_per_node=[4]) or c.update(cluster={"cpus_per_node": 2})
            ),
            "sweep.tasks_per_node[0]: 4 tasks x 1 CPUs",
        ),
        (lambda c: c["data"].update(split=[0.5, 0.1, 0.1]), "data.split: fractions"),
        (lambda c: c["launch"].update(srun_mpi="pmix; rm -rf /"), "launch.srun_mpi"),
        (lambda c: c["sweep"].pop("backends"), "config: sweep.backends: required, missing"),
    ],
)
def test_bad_config_names_the_field(mutate, expected):
    message = _bad(mutate)
    assert expected in message
    assert "\n" not in message


def test_weak_mode_scales_global_batch_and_strong_keeps_it():
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweep"]["modes"] = ["strong", "weak"]
    cfg = study_config.validate(cfg)
    batches = {
        (p.mode, p.ranks): launcher.run_config(cfg, p, "d")["optim"]["global_batch_size"]
        for p in study_plan.expand(cfg)
    }
    base = DEFAULT["train"]["optim"]["global_batch_size"]
    assert batches[("strong", 1)] == batches[("strong", 2)] == base
    assert batches[("weak", 1)] == base and batches[("weak", 2)] == 2 * base
    # Given per rank, strong mode turns it into the smallest configuration's global batch.
    cfg["train"]["optim"] = {"per_rank_batch_size": 32, "lr": 0.1}
    strong = {
        p.ranks: launcher.run_config(cfg, p, "d")["optim"]
        for p in study_plan.expand(cfg)
        if p.mode == "strong"
    }
    assert strong[1] == strong[2] == {"global_batch_size": 32, "lr": 0.1}
    weak = [
        launcher.run_config(cfg, p, "d")["optim"]
        for p in study_plan.expand(cfg)
        if p.mode == "weak"
    ]
    assert all(o == {"per_rank_batch_size": 32, "lr": 0.1} for o in weak)


def test_run_config_sets_backend_data_and_threads():
    cfg = study_config.validate(DEFAULT)
    point = study_plan.find(cfg, "horovod-strong-n1-t2-g0-r0")
    rc = launcher.run_config(cfg, point, Path("results/data"))
    assert rc["dist"]["backend"] == "horovod"
    assert rc["data"] == {"source": "staged", "path": "results/data"}
    assert rc["train"]["threads"] == 1
    with pytest.raises(UsageError, match="not in the sweep"):
        study_plan.find(cfg, "ddp-strong-n9-t1-g0-r0")
