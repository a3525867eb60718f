rule evaluate:
    input:
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
        data=staged_data(),
    output:
        f"{RESULTS}/runs/{{run}}/evaluation.json",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"
    retries: retries("evaluate")
    container:
        job_image
    resources:
        **slurm_site("evaluate"),
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
        data=lambda wildcards, input: os.path.dirname(input.data) if STAGED else None,
    shell:
        # a generated source (tokens) has a generated test split: no --data
        "scalelab evaluate --run {params.run_dir:q} "
        + ("--data {params.data:q} " if STAGED else "")
        + "--split test --out {output:q} > {log:q} 2>&1"
