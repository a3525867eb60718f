# One job per sweep point. `scalelab launch` starts the ranks itself: srun with
# explicit --mpi/--nodes/--ntasks flags inside a Slurm allocation (the `mpi`
# resource tells the slurm executor to run this shell command in the batch
# script rather than under its own srun), mpirun or torchrun elsewhere.
# A 1-rank point has no `mpi` resource: the executor's own `srun -n1` step runs it,
# and `scalelab launch` starts the single rank directly (no second srun inside).
# Resources come from study.slurm.point_resources (nodes, tasks, GPUs as a per-node gres,
# site settings); see README "Running on a Slurm cluster".
# Node-local staging, when enabled, happens at the start of each training job
# on its own nodes: scratch space only exists for the job's allocation.
rule train:
    input:
        staged_data(),
    output:
        f"{RESULTS}/runs/{{run}}/summary.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    retries: retries("train")
    container:
        ranks_enter_image
    threads: timed_threads(train_cores)
    resources:
        mpi=point_resource("mpi"),
        nodes=point_resource("nodes"),
        tasks=point_resource("tasks"),
        cpus_per_task=point_resource("cpus_per_task"),
        gres=point_resource("gres"),
        tasks_per_gpu=point_resource("tasks_per_gpu"),
        slurm_partition=point_resource("slurm_partition"),
        slurm_account=point_resource("slurm_account"),
        constraint=point_resource("constraint"),
        qos=point_resource("qos"),
        slurm_extra=point_resource("slurm_extra"),
        mem_mb_per_cpu=point_resource("mem_mb_per_cpu"),
        runtime=point_resource("runtime"),
    params:
        spec=job_spec,
        run_dir=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    shell:
        "scalelab launch --spec {params.spec:q} --out {params.run_dir:q} > {log:q} 2>&1"
