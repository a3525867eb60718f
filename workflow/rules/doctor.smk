rule doctor:
    output:
        f"{RESULTS}/doctor/local.json",
    log:
        "logs/doctor.log",
    shell:
        "scalelab doctor --mode local --json > {output} 2> {log}"
