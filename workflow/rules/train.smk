# One job per sweep point. `scalelab launch` starts the ranks itself: srun with
# explicit --mpi/--nodes/--ntasks flags inside a Slurm allocation (the `mpi`
# resource tells the slurm executor to run this shell command in the batch
# script rather than under its own srun), mpirun or torchrun elsewhere.
# Node-local staging, when enabled, happens at the start of each training job
# on its own nodes: scratch space only exists for the job's allocation.
rule train:
    input:
        DATA,
    output:
        f"{RESULTS}/runs/{{run}}/summary.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    container:
        ranks_enter_image
    threads: lambda wildcards: RUNS[wildcards.run].ranks * config["launch"]["cpus_per_task"]
    resources:
        **slurm_placement(),
        mpi="srun",
        nodes=train_resources("nodes"),
        tasks=train_resources("tasks"),
        cpus_per_task=train_resources("cpus_per_task"),
        mem_mb_per_cpu=train_resources("mem_mb_per_cpu"),
        runtime=train_resources("runtime"),
    params:
        spec=job_spec,
        run_dir=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    shell:
        "scalelab launch --spec {params.spec:q} --out {params.run_dir:q} > {log:q} 2>&1"
