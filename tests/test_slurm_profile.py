"""`snakemake --profile slurm` on the 3-node test cluster, as users run it.

* a study with 1-rank, 2-rank and 3-node points, both backends, commbench on: every job
  COMPLETED in squeue, the site settings on every job, 1-rank jobs without a nested srun;
* a 2-node x 2-GPU point through the plugin: the allocation Slurm made (stand-in GPUs:
  the test cluster's GRES are null devices; the ranks train on the CPU);
* the GPU points of config/resnet50-imagefolder-gpu.yaml: their sbatch and srun lines,
  as the plugin and `scalelab launch` build them, accepted by the real scheduler.
"""

from __future__ import annotations

import json
import re
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO
from test_workflow import copy_workflow, snakemake

from scalelab import launcher
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan
from scalelab.study import slurm as study_slurm

pytestmark = pytest.mark.cluster

FAST = ["--slurm-init-seconds-before-status-checks", "2"]


def _squeue(env) -> dict[str, dict]:
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%T|%D|%N|%k"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = {}
    for line in out.splitlines():
        jid, state, nodes, hosts, comment = line.split("|", 4)
        jobs[jid] = {"state": state, "nodes": int(nodes), "hosts": hosts, "comment": comment}
    return jobs


def _scontrol(jid: str, env) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out))


def test_study_of_1_2_and_3_node_points_completes(cluster, tmp_path):
    env = cluster.env()
    before = set(_squeue(env))
    wd = copy_workflow(cluster.shared_dir / f"study3-{tmp_path.name}")
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp", "horovod"], nodes=[1, 2, 3], tasks_per_node=[1])
    cfg["train"]["optim"]["global_batch_size"] = 48  # divisible by 1, 2 and 3 ranks
    cfg["train"]["train"]["epochs"] = 1
    # Sizes up to 8M: below ~1M the allreduce time is latency and noise on this shared
    # machine, and predict could only give a flagged bandwidth bound for a flat curve.
    cfg["commbench"] = {"enabled": True, "libs": ["torch", "mpi4py"], "max_bytes": "8M", "iters": 5}
    # Site settings reach every Slurm job (the test cluster's partition and node feature).
    cfg["resources"] = {
        "slurm_partition": "debug",
        "constraint": "scalelab",
        "slurm_extra": ["--open-mode=append"],
        "rules": {"stage": {"runtime": 7}},
    }
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(
        wd, ["--profile", "slurm", "--configfile", "study.yaml", *FAST], env=env, timeout=1200
    )

    jobs = {jid: j for jid, j in _squeue(env).items() if jid not in before}
    # stage, 6 training jobs, 6 evaluations, 2 commbench, analyze, predict
    assert len(jobs) == 17, jobs
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    for jid in jobs:
        info = _scontrol(jid, env)
        assert info["Partition"] == "debug" and info["Features"] == "scalelab", info
    by_rule = {}
    for j in jobs.values():
        by_rule.setdefault(j["comment"].split("_wildcards")[0], []).append(j)
    assert sorted(j["nodes"] for j in by_rule["rule_train"]) == [1, 1, 2, 2, 3, 3]
    assert [j["nodes"] for j in by_rule["rule_commbench"]] == [3, 3]  # like the largest point
    stage = next(jid for jid, j in jobs.items() if j["comment"] == "rule_stage")
    assert _scontrol(stage, env)["TimeLimit"] == "00:07:00"  # per-rule override

    for backend in ("ddp", "horovod"):
        for nodes in (1, 2, 3):
            run = f"{backend}-strong-n{nodes}-t1-g0-r0"
            info = json.loads((wd / "results" / "runs" / run / "run_info.json").read_text())
            assert len(set(info["hostnames"])) == nodes, info
            launch = next(
                line
                for line in (wd / "logs" / "train" / f"{run}.log").read_text().splitlines()
                if line.startswith("scalelab launch:")
            )
            # One rank runs directly in the plugin's own `srun -n1` step; more ranks get
            # srun with explicit flags inside the batch script.
            assert ("srun" in launch) == (nodes > 1), launch
    for lib in ("torch", "mpi4py"):
        records = (wd / "results" / "commbench" / lib / "commbench.jsonl").read_text()
        assert all(json.loads(r)["world_size"] == 3 for r in records.splitlines())
    assert (wd / "results" / "predict" / "ddp" / "prediction.csv").exists()


def test_gpu_point_gets_the_node_s_gpus(cluster, tmp_path):
    """A 2-node x 2-GPU point through the plugin: the allocation Slurm made."""
    env = cluster.env()
    before = set(_squeue(env))
    wd = copy_workflow(cluster.shared_dir / f"gpu-{tmp_path.name}")
    cfg = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp"], nodes=[2], tasks_per_node=[2], gpus_per_task=[1])
    cfg["cluster"] = {"gpus_per_node": 2}
    cfg["train"]["train"].update(epochs=1, device="cpu")  # stand-in GPUs: train on the CPU
    cfg["commbench"] = {"enabled": False}
    (wd / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    run = "ddp-strong-n2-t2-g1-r0"
    snakemake(
        wd,
        [
            "--profile",
            "slurm",
            "--configfile",
            "gpu.yaml",
            *FAST,
            f"results/runs/{run}/summary.json",
        ],
        env=env,
        timeout=900,
    )
    train = [
        jid
        for jid, j in _squeue(env).items()
        if jid not in before and j["comment"].startswith("rule_train")
    ]
    assert len(train) == 1
    info = _scontrol(train[0], env)
    assert info["JobState"] == "COMPLETED"
    assert (info["NumNodes"], info["NumTasks"]) == ("2", "4")
    assert info["TresPerNode"] == "gres:gpu:2"  # all the node's GPUs, per node
    assert "TresPerTask" not in info and "NtasksPerTRES" not in info, info  # no per-task binding
    log = (wd / "logs" / "train" / f"{run}.log").read_text()
    assert "--gres=gpu:2" in log and "--gpus-per-task" not in log
    summary = json.loads((wd / "results" / "runs" / run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4


def _plugin_sbatch(resources: dict, cpus_per_task: int) -> str:
    """The sbatch line the slurm executor plugin builds for a job with `resources`
    (its own get_submit_command and set_gres_string)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    res = Resources({k: v for k, v in resources.items() if v is not None})
    job = SimpleNamespace(resources=res, threads=cpus_per_task, name="train")
    params = {
        "run_uuid": "resnet",
        "slurm_logfile": "/dev/null",
        "comment_str": "rule_train",
        "account": "",
        "partition": f"-p {res.pop('slurm_partition', 'debug')}",
        "workdir": None,
    }
    return get_submit_command(job, params) + set_gres_string(job)


def test_resnet50_gpu_points_are_accepted_by_the_scheduler(cluster, tmp_path):
    """Every GPU point of the shipped GPU example: sbatch (built by the plugin) and srun
    (built by scalelab launch) lines the real scheduler accepts, 4 GPUs per node.

    The test cluster is small: nodes are capped at its 3, and a rank gets 1 CPU and
    100 MB instead of 16 CPUs and 3.8 GB; the GPU geometry is the config's own."""
    env = cluster.env()
    cfg = yaml.safe_load((REPO / "config" / "resnet50-imagefolder-gpu.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path)
    cfg["launch"]["cpus_per_task"] = 1
    cfg["cluster"]["cpus_per_node"] = 4
    cfg["resources"]["mem_mb_per_cpu"] = 100
    cfg = study_config.validate(cfg)
    points = {(p.nodes, p.tasks_per_node, p.gpus_per_task) for p in study_plan.expand(cfg)}
    assert points == {(n, 4, 1) for n in (1, 2, 4, 8)}
    for nodes, tpn, gpt in sorted(points):
        point = study_plan.RunPoint("ddp", "strong", min(nodes, 3), tpn, gpt, 0)
        res = study_slurm.point_resources(point, cfg, "train")
        sbatch = _plugin_sbatch(res, 1)
        assert "--gres=gpu:4" in sbatch and "--ntasks-per-gpu" not in sbatch, sbatch
        test = subprocess.run(
            f"{sbatch.replace('sbatch ', 'sbatch --test-only ', 1)} --wrap true",
            shell=True,
            env=env,
            capture_output=True,
            text=True,
        )
        assert test.returncode == 0 and "to start at" in test.stderr, (sbatch, test.stderr)
        srun = launcher.srun_argv(cfg["launch"], point)
        assert "--gres=gpu:4" in srun and not any(a.startswith("--gpus-per") for a in srun)
        check = subprocess.run(
            [srun[0], "--test-only", *srun[1:], "true"], env=env, capture_output=True, text=True
        )
        assert check.returncode == 0 and "to start at" in check.stderr, (srun, check.stderr)
    # More GPUs per node than a node has: the scheduler refuses the same line.
    over = study_plan.RunPoint("ddp", "strong", 1, 4, 2, 0)
    sbatch = _plugin_sbatch(study_slurm.point_resources(over, cfg, "train"), 1)
    refused = subprocess.run(
        f"{sbatch.replace('sbatch ', 'sbatch --test-only ', 1)} --wrap true",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0, refused.stderr
