# scalelab workflow: stage -> train sweep -> evaluate -> scaling analysis -> report.
# The logic lives in the `scalelab` package; these rules only call its CLI.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/doctor.smk"


rule all:
    input:
        f"{RESULTS}/doctor/local.json",
