"""The exact command lines `scalelab launch` runs."""

import os
import sys

from scalelab import launcher
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan
from scalelab.study import slurm as study_slurm
from scalelab.study.plan import RunPoint

LAUNCH = {
    "local": "mpirun",
    "srun_mpi": "pmix",
    "cpus_per_task": 2,
    "timeout_s": 60,
    "extra_srun_args": ["--cpu-bind=cores"],
    "socket_ifname": "ib0",
}
POINT = study_plan.RunPoint("ddp", "strong", 2, 4, 1, 0)


def test_srun_command_inside_allocation_has_explicit_flags():
    argv = launcher.launch_argv(
        LAUNCH, POINT, launcher.train_args("run.yaml", "out"), env={"SLURM_JOB_ID": "7"}
    )
    assert argv[0].endswith("srun")
    # GPUs per node, shared by the node's ranks (NCCL's intra-node paths need them all).
    assert argv[1:9] == [
        "--mpi=pmix",
        "--nodes=2",
        "--ntasks=8",
        "--ntasks-per-node=4",
        "--cpus-per-task=2",
        "--kill-on-bad-exit=1",
        "--gres=gpu:4",
        "--cpu-bind=cores",
    ]
    assert argv[9:] == [
        sys.executable,
        "-m",
        "scalelab",
        "train",
        "--config",
        "run.yaml",
        "--out",
        "out",
        "--resume",
    ]


def test_container_call_goes_inside_srun():
    prefix = ["apptainer", "exec", "--nv", "img.sif"]
    argv = launcher.launch_argv(
        LAUNCH,
        POINT,
        launcher.train_args("r.yaml", "o"),
        env={"SLURM_JOB_ID": "7"},
        container_prefix=prefix,
    )
    i = argv.index("apptainer")
    assert argv[0].endswith("srun") and i == 9
    assert argv[i : i + 6] == [*prefix, "scalelab", "train"]


def test_local_mpirun_and_torchrun():
    argv = launcher.launch_argv(
        LAUNCH,
        study_plan.RunPoint("horovod", "strong", 1, 2, 0, 0),
        launcher.train_args("r.yaml", "o"),
        env={},
    )
    assert argv[0].endswith("mpirun") and argv[1:3] == ["-n", "2"]
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert argv[argv.index(sys.executable) :] == [
        sys.executable,
        "-m",
        "scalelab",
        "train",
        "--config",
        "r.yaml",
        "--out",
        "o",
        "--resume",
    ]
    torch_argv = launcher.launch_argv(
        {**LAUNCH, "local": "torchrun"},
        study_plan.RunPoint("ddp", "strong", 1, 2, 0, 0),
        launcher.train_args("r.yaml", "o"),
        env={},
    )
    assert torch_argv == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "scalelab",
        "train",
        "--config",
        "r.yaml",
        "--out",
        "o",
        "--resume",
    ]


def test_rank_env_sets_threads_and_interfaces():
    env = launcher.rank_env(LAUNCH)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def test_one_rank_inside_slurm_runs_directly_not_under_a_second_srun():
    point = study_plan.RunPoint("ddp", "strong", 1, 1, 0, 0)
    argv = launcher.launch_argv(
        LAUNCH,
        point,
        launcher.train_args("r.yaml", "o"),
        env={"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"},
    )
    assert argv == [
        sys.executable,
        "-m",
        "scalelab",
        "train",
        "--config",
        "r.yaml",
        "--out",
        "o",
        "--resume",
    ]


CFG = study_config.validate(
    {
        "data": {"source": "synthetic", "num_samples": 2000},
        "train": {"optim": {"global_batch_size": 32}},
        "sweep": {
            "backends": ["ddp"],
            "nodes": [1, 2],
            "tasks_per_node": [1, 2],
            "gpus_per_task": [0, 1],
        },
        "cluster": {"gpus_per_node": 2},
        "resources": {
            "slurm_partition": "gpu",
            "qos": "high",
            "slurm_extra": ["--requeue"],
            "rules": {"train": {"slurm_account": "proj"}},
        },
    }
)


def test_slurm_resources_of_points():
    one = study_slurm.point_resources(RunPoint("ddp", "strong", 1, 1, 0, 0), CFG, "train")
    # No `mpi` resource for one rank: the plugin refuses mpi jobs with one task, and its
    # own `srun -n1` job step runs the rank.
    assert one["mpi"] is None and one["tasks"] == 1 and one["nodes"] == 1
    assert one["slurm_extra"] == "--requeue" and one["gres"] is None
    assert (one["slurm_partition"], one["slurm_account"], one["qos"]) == ("gpu", "proj", "high")
    gpu = study_slurm.point_resources(RunPoint("ddp", "strong", 2, 2, 1, 0), CFG, "train")
    assert gpu["mpi"] == "srun" and (gpu["nodes"], gpu["tasks"]) == (2, 4)
    # gres per node; tasks_per_gpu=0 stops the plugin adding --ntasks-per-gpu=<tasks>.
    assert gpu["gres"] == "gpu:2" and gpu["tasks_per_gpu"] == 0
    assert gpu["slurm_extra"] == "--requeue --ntasks-per-node=2"
    # Site settings reach the other rules too; the per-rule account only training.
    stage = study_slurm.slurm_resources(CFG, "stage")
    assert stage["slurm_partition"] == "gpu" and "slurm_account" not in stage


def test_commbench_is_placed_like_the_largest_training_point():
    point = study_plan.commbench_point(CFG)
    assert (point.nodes, point.tasks_per_node, point.gpus_per_task) == (2, 2, 1)
    res = study_slurm.point_resources(point, CFG, "commbench")
    assert res["gres"] == "gpu:2" and res["mpi"] == "srun" and res["slurm_partition"] == "gpu"
    assert res["slurm_account"] == "proj"  # the training jobs' own override too
    single = study_config.validate(
        {
            **CFG,
            "sweep": {**CFG["sweep"], "nodes": [1], "tasks_per_node": [1], "gpus_per_task": [0]},
        }
    )
    assert study_plan.commbench_point(single).ranks == 2  # something to communicate


def test_retry_policy_only_where_a_retry_can_help():
    assert study_slurm.rule_settings(CFG, "train")["retries"] == 1
    assert study_slurm.rule_settings(CFG, "commbench")["retries"] == 1
    for rule in ("stage", "evaluate", "analyze", "predict"):
        assert study_slurm.rule_settings(CFG, rule)["retries"] == 0


def test_predict_refuses_a_cpu_curve_for_a_gpu_study():
    import pytest

    from scalelab.comm.predict import check_curve
    from scalelab.errors import UsageError

    gloo = [{"backend": "gloo", "op": "allreduce"}]
    with pytest.raises(UsageError, match="cannot predict NCCL on GPUs"):
        check_curve(gloo, {"gpus": 8.0})
    check_curve(gloo, {"gpus": 8.0}, allow_cpu_curve=True)  # told to
    check_curve(gloo, {"gpus": 0.0})  # a CPU study: the CPU curve is the right one
    check_curve([{"backend": "nccl"}], {"gpus": 8.0})
