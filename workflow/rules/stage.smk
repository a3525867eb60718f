rule stage:
    output:
        directory(DATA),
    log:
        "logs/stage.log",
    benchmark:
        f"{RESULTS}/benchmarks/stage.tsv"
    retries: retries("stage")
    container:
        job_image
    resources:
        **slurm_site("stage"),
    params:
        args=stage_args(),
    shell:
        "scalelab data stage {params.args:q} --quiet --out {output:q} > {log:q} 2>&1"
