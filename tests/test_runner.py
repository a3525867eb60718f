"""The exact command lines `scalelab launch` runs."""

import os
import sys

from scalelab import runner, sweep

LAUNCH = {"local": "mpirun", "srun_mpi": "pmix", "cpus_per_task": 2, "timeout_s": 60,
          "extra_srun_args": ["--cpu-bind=cores"], "socket_ifname": "ib0"}
POINT = sweep.RunPoint("ddp", "strong", 2, 4, 1, 0)


def test_srun_command_inside_allocation_has_explicit_flags():
    argv = runner.launch_argv(LAUNCH, POINT, runner.train_args("run.yaml", "out"),
                                env={"SLURM_JOB_ID": "7"})
    assert argv[0].endswith("srun")
    assert argv[1:9] == ["--mpi=pmix", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                         "--cpus-per-task=2", "--kill-on-bad-exit=1", "--gpus-per-task=1",
                         "--cpu-bind=cores"]
    assert argv[9:] == [sys.executable, "-m", "scalelab", "train", "--config", "run.yaml",
                        "--out", "out", "--resume"]


def test_container_call_goes_inside_srun():
    prefix = ["apptainer", "exec", "--nv", "img.sif"]
    argv = runner.launch_argv(LAUNCH, POINT, runner.train_args("r.yaml", "o"),
                              env={"SLURM_JOB_ID": "7"},
                              container_prefix=prefix)
    i = argv.index("apptainer")
    assert argv[0].endswith("srun") and i == 9
    assert argv[i:i + 6] == [*prefix, "scalelab", "train"]


def test_local_mpirun_and_torchrun():
    argv = runner.launch_argv(LAUNCH, sweep.RunPoint("horovod", "strong", 1, 2, 0, 0),
                              runner.train_args("r.yaml", "o"), env={})
    assert argv[0].endswith("mpirun") and argv[1:3] == ["-n", "2"]
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert argv[argv.index(sys.executable):] == [sys.executable, "-m", "scalelab", "train",
                                                 "--config", "r.yaml", "--out", "o", "--resume"]
    torch_argv = runner.launch_argv({**LAUNCH, "local": "torchrun"},
                                    sweep.RunPoint("ddp", "strong", 1, 2, 0, 0),
                                    runner.train_args("r.yaml", "o"), env={})
    assert torch_argv == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "-m", "scalelab", "train", "--config", "r.yaml",
                          "--out", "o", "--resume"]


def test_rank_env_sets_threads_and_interfaces():
    env = runner.rank_env(LAUNCH)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
