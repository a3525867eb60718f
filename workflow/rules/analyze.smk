from scalelab.fsio import atomic_write

LARGEST = max(RUNS.values(), key=lambda p: (p.ranks, p.nodes))


# commbench measures the collectives on the layout of the sweep's largest training
# point, placed like it: same nodes, ranks per node, GPUs (per-node gres), partition,
# account, constraint and qos (study.slurm.point_resources), so `predict` extrapolates from
# the network and library the training used (NCCL when GPUs are allocated).
COMMBENCH = study_plan.commbench_point(config)


rule commbench:
    output:
        directory(f"{RESULTS}/commbench/{{lib}}"),
    log:
        "logs/commbench/{lib}.log",
    benchmark:
        f"{RESULTS}/benchmarks/commbench/{{lib}}.tsv"
    retries: retries("commbench")
    container:
        ranks_enter_image
    threads: timed_threads(COMMBENCH.ranks * config["launch"]["cpus_per_task"])
    resources:
        **{
            k: v
            for k, v in study_slurm.point_resources(
                COMMBENCH, config, "commbench"
            ).items()
            if v is not None
        },
    params:
        layout=[
            f"--nodes={COMMBENCH.nodes}",
            f"--tasks-per-node={COMMBENCH.tasks_per_node}",
            f"--cpus-per-task={config['launch']['cpus_per_task']}",
            f"--gpus-per-task={COMMBENCH.gpus_per_task}",
            f"--local={config['launch']['local']}",
            f"--mpi={config['launch']['srun_mpi']}",
        ],
        bench=[
            f"--max-bytes={config['commbench']['max_bytes']}",
            f"--iters={config['commbench']['iters']}",
        ],
    shell:
        "scalelab launch {params.layout:q} -- commbench --lib {wildcards.lib} "
        "{params.bench:q} --out {output:q} > {log:q} 2>&1"


rule analyze:
    input:
        summaries=expand(f"{RESULTS}/runs/{{run}}/summary.json", run=sorted(RUNS)),
        evals=evaluations(),
        # the commbench curves join the report through this rule (none when it is off)
        curves=(
            expand(
                f"{RESULTS}/report/commbench-{{lib}}.png",
                lib=config["commbench"]["libs"],
            )
            if config["commbench"]["enabled"]
            else []
        ),
    output:
        table=report(
            f"{RESULTS}/analysis/scaling.html",
            caption="../report/scaling_table.rst",
            category="Scaling analysis",
            labels={"item": "table: scaling with flags"},
        ),
        csv=report(
            f"{RESULTS}/analysis/scaling.csv",
            caption="../report/scaling_csv.rst",
            category="Scaling analysis",
            labels={"item": "table: scaling.csv"},
        ),
        markdown=f"{RESULTS}/analysis/scaling.md",
        throughput=report(
            f"{RESULTS}/analysis/plots/throughput.png",
            caption="../report/plot_throughput.rst",
            category="Scaling analysis",
            labels={"item": "plot: throughput"},
        ),
        efficiency=report(
            f"{RESULTS}/analysis/plots/efficiency.png",
            caption="../report/plot_efficiency.rst",
            category="Scaling analysis",
            labels={"item": "plot: efficiency"},
        ),
        breakdown=report(
            f"{RESULTS}/analysis/plots/breakdown.png",
            caption="../report/plot_breakdown.rst",
            category="Scaling analysis",
            labels={"item": "plot: breakdown"},
        ),
        fits=report(
            f"{RESULTS}/analysis/plots/fits.png",
            caption="../report/plot_fits.rst",
            category="Scaling analysis",
            labels={"item": "plot: fits"},
        ),
        backends=report(
            f"{RESULTS}/analysis/plots/backends.png",
            caption="../report/plot_backends.rst",
            category="Scaling analysis",
            labels={"item": "plot: backends"},
        ),
        memory=report(
            f"{RESULTS}/analysis/plots/memory.png",
            caption="../report/plot_memory.rst",
            category="Scaling analysis",
            labels={"item": "plot: memory per rank"},
        ),
    log:
        "logs/analyze.log",
    retries: retries("analyze")
    container:
        job_image
    resources:
        **slurm_site("analyze"),
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.summaries],
        out=lambda wildcards, output: os.path.dirname(output.table),
        extra=analysis_args(),
    shell:
        "scalelab analyze {params.runs:q} --out {params.out:q} {params.extra:q} > {log:q} 2>&1"


rule predict:
    input:
        commbench=f"{RESULTS}/commbench/torch",
        summaries=expand(f"{RESULTS}/runs/{{run}}/summary.json", run=sorted(RUNS)),
    output:
        plot=report(
            f"{RESULTS}/predict/ddp/prediction.png",
            caption="../report/predict.rst",
            category="Prediction",
            labels={"item": "prediction: DDP at larger scales"},
        ),
        table=f"{RESULTS}/predict/ddp/prediction.csv",
        errors=report(
            f"{RESULTS}/predict/ddp/errors.csv",
            caption="../report/predict_errors.rst",
            category="Prediction",
            labels={"item": "prediction: error at measured scales"},
        ),
    log:
        "logs/predict.log",
    retries: retries("predict")
    container:
        job_image
    resources:
        **slurm_site("predict"),
    params:
        base=lambda wildcards: f"{RESULTS}/runs/{smallest_run('ddp').run_id}",
        measured=lambda wildcards: [
            f"{RESULTS}/runs/{p.run_id}"
            for p in RUNS.values()
            if p.backend == "ddp" and not p.model_parallel
        ],
        out=lambda wildcards, output: os.path.dirname(output.table),
        scale=[
            f"--max-nodes={config['analysis']['predict_nodes']}",
            f"--ranks-per-node={config['analysis']['predict_ranks_per_node']}",
        ],
    shell:
        "scalelab predict --commbench {input.commbench:q} --run {params.base:q} "
        "--measured {params.measured:q} --backend ddp {params.scale:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule commbench_curves:
    input:
        f"{RESULTS}/commbench/{{lib}}",
    output:
        report(
            f"{RESULTS}/report/commbench-{{lib}}.png",
            caption="../report/commbench.rst",
            category="Communication",
            labels={"item": "commbench: {lib}"},
        ),
    log:
        "logs/commbench_curves/{lib}.log",
    wildcard_constraints:
        lib="[A-Za-z0-9_]+",
    localrule: True
    run:
        data = Path(input[0], "commbench.png").read_bytes()
        atomic_write(output[0], lambda fh: fh.write(data))
        atomic_write_text(log[0], f"copied {input[0]}/commbench.png\n")


rule effective_config:
    output:
        config=report(
            f"{RESULTS}/config.yaml",
            caption="../report/config.rst",
            category="Configuration",
            labels={"item": "effective config"},
        ),
        plan=f"{RESULTS}/sweep.json",
    log:
        "logs/effective_config.log",
    localrule: True
    params:
        text=yaml.safe_dump(config, sort_keys=False),
        plan=sweep_plan_json(),
    run:
        atomic_write_text(output.config, params.text)
        atomic_write_text(output.plan, params.plan)
        atomic_write_text(log[0], f"wrote {output.config} and {output.plan}\n")
