# The study to MLflow, after every other output exists: `scalelab track sync` on the
# submit host (a local rule: compute nodes often have no route to the server). It sends
# only what the server lacks: what the runs sent live is not sent twice, and what they
# could not send (tracking.mlflow.live: false, a server down) is sent here. A failure
# fails this rule alone, and the next invocation tries again.
rule track:
    input:
        study_targets(),
    output:
        TRACK_RECORD,
    log:
        "logs/track.log",
    localrule: True
    container:
        on_the_host
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
        uri=config["tracking"]["mlflow"]["uri"] or "",
        experiment=config["tracking"]["mlflow"]["experiment"],
    shell:
        "scalelab track sync {params.results:q} --mlflow {params.uri:q} "
        "--experiment {params.experiment:q} --record {output:q} > {log:q} 2>&1"
