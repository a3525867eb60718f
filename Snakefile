# scalelab workflow: stage -> train sweep -> evaluate -> scaling analysis -> report.
# The logic lives in the `scalelab` package; the rules only call its CLI.
from snakemake.utils import min_version

min_version("9.0")

# Before Snakemake reads config/config.yaml: the study's own path gets the safe character
# set of every config path, and every config file goes through scalelab's one loader
# (duplicate keys, alias bombs, encodings, __use_yte__); one line and exit 2 otherwise.
from scalelab.study.files import workflow_preflight

workflow_preflight(workflow, "config/config.yaml")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    run="|".join(sorted(RUNS)),


include: "workflow/rules/stage.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/track.smk"


rule all:
    default_target: True
    input:
        final_targets(),
