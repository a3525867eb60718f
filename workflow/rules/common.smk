# Validate the config (one pydantic definition, scalelab.study.config, from which
# workflow/schemas/ is generated, plus checks a model cannot express) before any job is
# planned, and plan the sweep once (scalelab.study.plan): the same plan serves the runs,
# the skipped combinations, commbench's layout and every job spec.
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from scalelab import launcher
from scalelab.data import kinds
from scalelab.study import config as study_config
from scalelab.study import slurm as study_slurm
from scalelab.study.checks import stages_data
from scalelab.study import plan as study_plan
from scalelab.study import tracking as study_tracking
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write_text

# Jobs call the CLI of the environment this Snakemake runs in (on cluster nodes
# Snakemake re-runs the same interpreter). Inside the image (--sdm apptainer sets
# APPTAINER_CONTAINER there) the image's own scalelab comes first: the host's venv,
# visible through the bound workdir, must not shadow it.
shell.prefix(
    'set -euo pipefail; [ -n "${{APPTAINER_CONTAINER:-${{SINGULARITY_CONTAINER:-}}}}" ] || '
    f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
)

# study_config.validate checks everything that can be checked without running a job, every
# sweep point's resolved run config included (see its docstring); it is cheap, because
# Snakemake re-parses this file inside every job. A bad config is one line and exit 2
# (scalelab's convention for bad usage), before anything is staged, logged or submitted.
try:
    _validated = study_config.validate(config, source="config")
except UsageError as _err:
    print(f"scalelab workflow: error: {_err}", file=sys.stderr, flush=True)
    raise SystemExit(2)
config.clear()
config.update(_validated)

if config["container"]["enabled"]:
    # Image present, hashed by content and equal to the pin, a runtime installed:
    # checked once per invocation on the submit host, before any job is submitted.
    # Jobs (which re-parse this file) read the submit host's record instead of hashing
    # again; they get the digest (container.sha256) and the record in their spec.
    from scalelab.container import (
        PIN_RECORD_KEY,
        export_sdm_binds,
        workflow_image,
    )
    from scalelab.container import detect as _detect_runtime

    try:
        if _detect_runtime(config["container"]["runtime"]) is None:
            raise UsageError(
                "container.enabled: no apptainer or singularity on PATH "
                "(install Apptainer or load its module)"
            )
        _section = {
            k: v for k, v in config["container"].items() if v not in (None, [], {})
        }
        _alias, _pin, _record = workflow_image(
            _section, submit_host=workflow.is_main_process
        )
    except UsageError as _err:
        raise WorkflowError(f"container: {_err}") from None
    config["container"]["sha256"] = _pin.sha256
    config["container"][PIN_RECORD_KEY] = _record
    # Dataset, scratch and an absolute results directory, seen inside --sdm jobs.
    export_sdm_binds(config)

RESULTS = config["results"]
DATA = f"{RESULTS}/data"
PLAN = study_plan.plan(config)
_POINTS, SKIPPED = PLAN
RUNS = {point.run_id: point for point in _POINTS}
# Combinations of the sweep lists that cannot exist (e.g. horovod with tp or pp > 1) are
# skipped, and said so once, when the workflow starts (RESULTS/sweep.json lists them too).
if SKIPPED and workflow.is_main_process:
    print(
        f"scalelab workflow: {study_plan.plan_summary(config)}",
        file=sys.stderr,
        flush=True,
    )
# A generated source (tokens) is not staged; its test split is generated too.
STAGED = stages_data(config)

# Trackers (tracking:): each training job's launcher receives the study's key and
# tracking settings through the environment (SCALELAB_TRACKING), not a rule parameter,
# so a changed tracking server never retrains the study. Set again in every job.
TRACKING = study_tracking.export(config, os.environ)
#: What the track rule sent to MLflow (the study, after everything else).
TRACK_RECORD = f"{RESULTS}/tracking/mlflow.json"

# Under --sdm apptainer, Snakemake pastes this path unquoted into a shell command:
# it is the digest-named alias of workflow_image, never the configured path.
IMAGE = _alias if config["container"]["enabled"] else None


def job_image(wildcards):
    """The image a whole job runs in under --sdm apptainer (None: on the host)."""
    return IMAGE


def ranks_enter_image(wildcards):
    """Jobs that start ranks with srun stay on the host: `scalelab launch` puts
    `apptainer exec IMAGE` inside srun (the hybrid model), never srun inside the image.
    """
    return None


def on_the_host(wildcards):
    """Rules that talk to a service outside the cluster (the tracking server) run with
    the submit host's scalelab, its network and CA trust, never in the image."""
    return None


def stage_args():
    """`scalelab stage` arguments from the data section, one list item each."""
    d = config["data"]
    args = ["--source", d["source"], "--seed", str(d["seed"])]
    args += [
        "--split",
        ",".join(str(f) for f in d["split"]),
        "--shards",
        str(d["shards"]),
    ]
    if d.get("path"):
        args += ["--path", d["path"]]
    if d.get("image_size"):
        args += ["--image-size", str(d["image_size"]), str(d["image_size"])]
    if d["source"] == kinds.STAGE_SYNTHETIC:
        # Only synthetic data has these knobs (a --configfile merged onto the default
        # config inherits them for other sources too).
        if d.get("num_samples"):
            args += ["--num-samples", str(d["num_samples"])]
        if d.get("num_classes"):
            args += ["--num-classes", str(d["num_classes"])]
    return args


def job_spec(wildcards):
    return json.dumps(launcher.job_spec(config, wildcards.run, DATA), sort_keys=True)


def timed_threads(cores_on_slurm):
    """Threads of a timed job (training, commbench): every core of this machine under the
    local executor, so nothing runs beside it and its timings are uncontended; on Slurm
    the allocation isolates it, and the value only sizes the job."""

    def get(wildcards):
        if workflow.local_exec:
            return workflow.cores
        return cores_on_slurm(wildcards) if callable(cores_on_slurm) else cores_on_slurm

    return get


def train_cores(wildcards):
    """Cores a training job's ranks use: ranks x launch.cpus_per_task."""
    return RUNS[wildcards.run].ranks * config["launch"]["cpus_per_task"]


def point_resource(key):
    """One Slurm resource of a training job, from its sweep point (None: not set)."""

    def get(wildcards):
        return study_slurm.point_resources(RUNS[wildcards.run], config, "train")[key]

    return get


def slurm_site(rule):
    """Partition, account, constraint, qos, extra options, runtime and memory of `rule`."""
    return study_slurm.slurm_resources(config, rule)


def retries(rule):
    """Retry policy (see study.slurm.RETRYABLE_RULES): only where a retry can help."""
    return study_slurm.rule_settings(config, rule)["retries"]


def analysis_args():
    a = config["analysis"]
    args = [f"--threshold={a['threshold']}"]
    if a["target_accuracy"]:
        args.append(f"--target-accuracy={a['target_accuracy']}")
    for csv in a["from_csv"]:
        args += ["--from-csv", csv]
    return args


def smallest_run(backend):
    """The base of a prediction: the backend's smallest data-parallel point (no tp, no pp)."""
    return min(
        (p for p in RUNS.values() if p.backend == backend and not p.model_parallel),
        key=lambda p: (p.ranks, p.repeat),
    )


# The stage rule's output is the dataset's manifest, not directory(DATA): Snakemake deletes
# a directory output whole before a rerun (-R stage), a user's files in it too, while
# `scalelab data stage --force` replaces DATA only if it holds nothing else (output_guard.guard).
DATA_MANIFEST = f"{DATA}/manifest.json"


def staged_data():
    """The training jobs' input: the staged dataset's manifest, or nothing for a generated
    source."""
    return DATA_MANIFEST if STAGED else []


def evaluations():
    """Every run's test-split evaluation (staged, or generated for a generated source)."""
    return expand(f"{RESULTS}/runs/{{run}}/evaluation.json", run=sorted(RUNS))


def sweep_plan_json():
    """RESULTS/sweep.json: the runs and the skipped combinations, machine-readable."""
    return json.dumps(PLAN.as_dict(), indent=2) + "\n"


def final_targets():
    """The default target: the study's outputs, then (with an MLflow server) the track
    rule's record of sending them."""
    targets = study_targets()
    if TRACKING is not None and TRACKING.tracking.mlflow.uri:
        targets.append(TRACK_RECORD)
    return targets


def study_targets():
    """Runs, evaluations, analysis, benchmarks, prediction."""
    targets = [f"{RESULTS}/analysis/scaling.csv", f"{RESULTS}/config.yaml"]
    targets += expand(f"{RESULTS}/runs/{{run}}/summary.json", run=sorted(RUNS))
    targets += evaluations()
    cb = config["commbench"]
    if cb["enabled"]:
        targets += expand(f"{RESULTS}/commbench/{{lib}}", lib=cb["libs"])
        if "torch" in cb["libs"] and any(
            p.backend == "ddp" and not p.model_parallel for p in RUNS.values()
        ):
            targets.append(f"{RESULTS}/predict/ddp/prediction.csv")
    return targets
