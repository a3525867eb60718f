# scalelab workflow: stage -> train sweep -> evaluate -> scaling analysis -> report.
# The logic lives in the `scalelab` package; the rules only call its CLI.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    run="|".join(sorted(RUNS)),


include: "workflow/rules/stage.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"


rule all:
    default_target: True
    input:
        final_targets(),
