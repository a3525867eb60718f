rule stage:
    output:
        DATA_MANIFEST,
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
        data=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "scalelab data stage {params.args:q} --quiet --force --out {params.data:q} > {log:q} 2>&1"
