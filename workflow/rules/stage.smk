rule stage:
    output:
        directory(DATA),
    log:
        "logs/stage.log",
    benchmark:
        f"{RESULTS}/benchmarks/stage.tsv"
    container:
        job_image
    params:
        args=stage_args(),
    shell:
        "scalelab stage {params.args:q} --quiet --out {output:q} > {log:q} 2>&1"
