"""The study config's checks beyond types and bounds: safe strings, data, the cluster.

What a schema cannot express, run by :func:`scalelab.study.config.validate` on the typed
and defaulted config: every string that can reach sbatch, srun, apptainer or a job's shell
passes one character set; data paths exist; run-config fields the workflow owns are not
written in ``train``; the sweep fits the cluster. Each error is one line naming the field.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from scalelab.backends.registry import SINGLE
from scalelab.data import kinds
from scalelab.errors import UsageError
from scalelab.train.config import TOKEN_MODELS

# Characters allowed in config values that become paths or names on a command line.
_PATH_CHARS = "letters, digits and . _ / + = : @ % , ~ -"
_PATH_RE = re.compile(r"[A-Za-z0-9._/+=:@%,~-]")
_NAME_CHARS = "letters, digits and . _ - ,"
_NAME_RE = re.compile(r"[A-Za-z0-9._,-]")
_CONSTRAINT_CHARS = "letters, digits and . _ - , & | * [ ]"
_CONSTRAINT_RE = re.compile(r"[A-Za-z0-9._,&|*\[\]-]")
_OPTION_RE = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9._/+=:@%,~-]+)?$")

#: sbatch options the slurm plugin or this workflow sets itself: not allowed in slurm_extra.
_MANAGED_SBATCH = (
    "job-name",
    "output",
    "error",
    "parsable",
    "export",
    "comment",
    "workdir",
    "chdir",
    "account",
    "partition",
    "mem",
    "mem-per-cpu",
    "ntasks",
    "ntasks-per-node",
    "ntasks-per-gpu",
    "cpus-per-task",
    "cpus-per-gpu",
    "time",
    "constraint",
    "qos",
    "nodes",
    "clusters",
    "gres",
    "gpus",
    "gpus-per-task",
    "gpus-per-node",
    "wrap",
)


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# --------------------------------------------------------------------------- values


def _check_finite(node: Any, path: list, source: str) -> None:
    """NaN and infinities pass JSON-schema bounds (every comparison is false): refuse them."""
    if isinstance(node, float) and not math.isfinite(node):
        raise UsageError(f"{source}: {_path(path)}: must be a finite number, got {node}")
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, [*path, k], source)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_finite(v, [*path, i], source)


def _check_chars(
    value: str, where: str, allowed: re.Pattern, described: str, what: str, source: str
) -> None:
    for ch in value:
        if not allowed.fullmatch(ch):
            raise UsageError(
                f"{source}: {where}: character {ch!r} is not allowed in {what} "
                f"(allowed: {described})"
            )


def check_path(value: str, where: str, source: str = "config") -> None:
    """A path that reaches a command line: safe characters, not empty, no leading '-'."""
    if not value:
        raise UsageError(f"{source}: {where}: must not be empty")
    _check_chars(value, where, _PATH_RE, _PATH_CHARS, "a path", source)
    if value.startswith("-"):
        raise UsageError(
            f"{source}: {where}: a path must not start with '-' (it would read as an option)"
        )


#: What a study ships (README, Snakefile and these directories): never an output.
STUDY_DIRS = (
    ".git",
    ".snakemake",
    ".test",
    "benchmarks",
    "config",
    "containers",
    "docs",
    "envs",
    "profiles",
    "slurm",
    "src",
    "tests",
    "workflow",
)


def check_results(value: str, source: str = "config", study: str | Path = ".") -> None:
    """``results`` is a directory of outputs only: not the filesystem root, not the study
    (or a directory above it), not one of the directories the study ships (config,
    .test, workflow...), whose files the workflow would then treat as its outputs."""
    target = Path(os.path.abspath(Path(study) / value))
    root = Path(os.path.abspath(study))
    why = None
    if target == Path(target.anchor):
        why = "the filesystem root"
    elif target == root or target in root.parents:
        why = "the study directory itself" if target == root else "a directory above the study"
    elif root in target.parents:
        top = target.relative_to(root).parts[0]
        if top in STUDY_DIRS:
            inside = "" if target == root / top else "inside "
            why = f"{inside}{top}/, a directory the study ships"
    if why:
        raise UsageError(
            f"{source}: results: {value!r} is {why}; give a directory of its "
            f"own for the outputs (e.g. results)"
        )


def check_option(value: str, where: str, source: str = "config") -> None:
    """One extra command-line option: ``--name`` or ``--name=value`` with safe characters."""
    if not _OPTION_RE.match(value):
        bad = next((c for c in value if not _PATH_RE.fullmatch(c)), None)
        why = f"character {bad!r} is not allowed" if bad else "expected --option or --option=value"
        raise UsageError(
            f"{source}: {where}: {why} (one list item per option, e.g. --cpu-bind=cores)"
        )


def _check_strings(cfg: dict, source: str) -> None:
    """Every config string that can reach sbatch, srun, apptainer or a job's shell."""
    paths = [
        ("results", cfg["results"]),
        ("data.path", cfg["data"]["path"]),
        ("data.scratch", cfg["data"]["scratch"]),
        ("container.image", cfg["container"]["image"]),
    ]
    paths += [(f"analysis.from_csv[{i}]", p) for i, p in enumerate(cfg["analysis"]["from_csv"])]
    paths += [(f"container.binds[{i}]", p) for i, p in enumerate(cfg["container"]["binds"])]
    keys = cfg["container"].get("trusted_keys") or []
    paths += [(f"container.trusted_keys[{i}]", p) for i, p in enumerate(keys)]
    for where, value in paths:
        if value is not None:
            check_path(value, where, source)
    check_results(cfg["results"], source)
    for i, opt in enumerate(cfg["launch"]["extra_srun_args"]):
        check_option(opt, f"launch.extra_srun_args[{i}]", source)
    for i, opt in enumerate(cfg["container"]["exec_flags"]):
        check_option(opt, f"container.exec_flags[{i}]", source)
    for key in cfg["container"]["env"]:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"{source}: container.env.{key}: not a valid variable name")
    ifname = cfg["launch"]["socket_ifname"]
    if ifname is not None:
        _check_chars(
            ifname,
            "launch.socket_ifname",
            re.compile(r"[A-Za-z0-9._:^,-]"),
            "letters, digits and . _ : ^ , -",
            "an interface name",
            source,
        )
    res = cfg["resources"]
    for where, section in [
        ("resources", res),
        *((f"resources.rules.{r}", s) for r, s in res["rules"].items()),
    ]:
        _check_site(section, where, source)


def _check_site(section: dict, where: str, source: str) -> None:
    for key in ("slurm_partition", "slurm_account", "qos"):
        if section.get(key) is not None:
            _check_chars(
                section[key], f"{where}.{key}", _NAME_RE, _NAME_CHARS, "a Slurm name", source
            )
    if section.get("constraint") is not None:
        _check_chars(
            section["constraint"],
            f"{where}.constraint",
            _CONSTRAINT_RE,
            _CONSTRAINT_CHARS,
            "a constraint",
            source,
        )
    for i, opt in enumerate(section.get("slurm_extra") or []):
        item = f"{where}.slurm_extra[{i}]"
        check_option(opt, item, source)
        name = opt[2:].split("=", 1)[0]
        if name in _MANAGED_SBATCH:
            raise UsageError(
                f"{source}: {item}: --{name} is set by the workflow (use the "
                f"resources keys, the sweep or the cluster section instead)"
            )


# --------------------------------------------------------------------------- semantics

#: Run-config fields the workflow sets itself, and the workflow key that controls each.
_WORKFLOW_OWNED = {
    ("data", "source"): "data.source (the workflow trains on the staged data)",
    ("data", "path"): "data.path (the workflow trains on the staged data)",
    ("data", "localize"): "data.node_local",
    ("data", "scratch"): "data.scratch",
    ("dist", "backend"): "sweep.backends",
    ("dist", "timeout_s"): "launch.timeout_s",
    ("dist", "socket_ifname"): "launch.socket_ifname",
    ("train", "threads"): "launch.cpus_per_task",
}

#: The optional sweep lists, each with the ``train.dist`` field it sets: a list given
#: owns its field (written in ``train`` as well, it is refused); a list left out leaves
#: the field as written.
OPTIONAL_KNOBS = {"tp": "tp", "pp": "pp", "microbatches": "microbatches", "schedule": "schedule"}
#: Sweep lists that describe a pipeline: they need ``sweep.pp`` with a value above 1.
PIPELINE_KNOBS = ("microbatches", "schedule")

#: Images of the sources whose size is known without reading them.
_KNOWN_SIZES = kinds.KNOWN_SIZES
#: `scalelab stage --source synthetic` defaults (data/cli.py).
_SYNTHETIC_DEFAULTS = (10000, 10)


def _check_semantics(cfg: dict, source: str) -> None:
    """What the schema cannot express: data, the run config's owned fields, the cluster."""
    _check_data(cfg["data"], source)
    for i, csv in enumerate(cfg["analysis"]["from_csv"]):
        if not os.path.isfile(csv):
            raise UsageError(f"{source}: analysis.from_csv[{i}]: no such file: {csv}")
    _check_owned(cfg, source)
    _check_model_data(cfg, source)
    _check_fits_cluster(cfg, source)


def _check_model_data(cfg: dict, source: str) -> None:
    """A language model trains on token sequences, an image model on images: the other
    pairing fails in the job, so it fails here (the run config refuses it too)."""

    model = cfg["train"].get("model")
    name = model.get("name", "cnn") if isinstance(model, dict) else "cnn"
    data = cfg["data"]["source"]
    if name in TOKEN_MODELS and data not in GENERATED_SOURCES:
        raise UsageError(
            f"{source}: train.model.name: model {name!r} trains on token "
            f"sequences, but data.source {data!r} is images (use data.source: "
            f"tokens)"
        )
    if name not in TOKEN_MODELS and data in GENERATED_SOURCES and isinstance(name, str):
        raise UsageError(
            f"{source}: train.model.name: model {name!r} trains on images, but "
            f"data.source {data!r} is token sequences (use model gpt)"
        )


_SPLIT_NAMES = ("train", "validation", "test")

#: Data keys that place staged data: meaningless for a generated source. (The keys that
#: size synthetic images are ignored like for every other source: a --configfile merged
#: onto config/config.yaml inherits them.)
_STAGING_ONLY = ("node_local", "scratch")


def _check_data(data: dict, source: str) -> None:
    split = data["split"]
    if abs(sum(split) - 1.0) > 1e-6:
        raise UsageError(f"{source}: data.split: fractions {split} sum to {sum(split):g}, not 1")
    for i, frac in enumerate(split):
        if frac <= 0:
            raise UsageError(
                f"{source}: data.split[{i}]: the {_SPLIT_NAMES[i]} fraction must "
                f"be > 0 (an empty {_SPLIT_NAMES[i]} split cannot be "
                f"{'trained on' if i == 0 else 'measured'})"
            )
    _check_data_path(data, source)
    if data["source"] in GENERATED_SOURCES:
        for key in _STAGING_ONLY:
            if data.get(key):
                raise UsageError(
                    f"{source}: data.{key}: not used by source {data['source']!r}, which every "
                    f"rank generates: nothing is staged or copied"
                )
    total, classes = _dataset_size(data)
    if total is not None:
        for i in (1, 2):
            if total * split[i] / classes < 0.5:
                raise UsageError(
                    f"{source}: data.split[{i}]: {split[i]:g} of {total} images over {classes} "
                    f"classes leaves the {_SPLIT_NAMES[i]} split empty (stratified per class)"
                )


def _check_data_path(data: dict, source: str) -> None:
    if data["source"] in kinds.STAGE_PATHS:
        if not data.get("path"):
            raise UsageError(f"{source}: data.path: required for source {data['source']!r}")
        if not os.path.exists(data["path"]):
            raise UsageError(
                f"{source}: data.path: no such {kinds.STAGE_PATHS[data['source']]}: {data['path']}"
            )
    elif data.get("path"):
        raise UsageError(
            f"{source}: data.path: only used by the "
            f"{' and '.join(kinds.STAGE_PATHS)} sources, not {data['source']!r}"
        )


def _check_owned(cfg: dict, source: str) -> None:
    """Run-config fields the workflow sets itself may not be written in ``train``."""
    train = cfg["train"]
    if not isinstance(train, dict):
        raise UsageError(f"{source}: train: expected a mapping")
    owned = dict(_WORKFLOW_OWNED)
    for knob, field in OPTIONAL_KNOBS.items():
        if cfg["sweep"].get(knob):
            owned[("dist", field)] = f"sweep.{knob}"
    for (section, key), owner in owned.items():
        if isinstance(train.get(section), dict) and key in train[section]:
            raise UsageError(
                f"{source}: train.{section}.{key}: set by the workflow from {owner}; remove it here"
            )
    _check_pipeline_knobs(cfg["sweep"], source)


def _check_pipeline_knobs(sweep: dict, source: str) -> None:
    """A micro-batch or schedule list without a pipeline in the sweep would change no run
    (a point with pp = 1 takes neither), so it is refused rather than ignored."""
    for knob in PIPELINE_KNOBS:
        if sweep.get(knob) and max(sweep.get("pp") or [1]) == 1:
            raise UsageError(
                f"{source}: sweep.{knob}: applies to pipelines, and no point has one; "
                "give sweep.pp a value above 1 (train.dist.pp moves there)"
            )


def _check_fits_cluster(cfg: dict, source: str) -> None:
    sw, cl = cfg["sweep"], cfg["cluster"]
    cpus = cl.get("cpus_per_node")
    per_task = cfg["launch"]["cpus_per_task"]
    for i, tpn in enumerate(sw["tasks_per_node"]):
        if cpus and tpn * per_task > cpus:
            raise UsageError(
                f"{source}: sweep.tasks_per_node[{i}]: {tpn} tasks x {per_task} CPUs "
                f"(launch.cpus_per_task) do not fit a node of {cpus} CPUs "
                f"(cluster.cpus_per_node)"
            )
    for i, n in enumerate(sw["nodes"]):
        if cl.get("nodes") and n > cl["nodes"]:
            raise UsageError(
                f"{source}: sweep.nodes[{i}]: {n} nodes, but the cluster has "
                f"{cl['nodes']} (cluster.nodes)"
            )
    gpus = cl["gpus_per_node"]
    for i, g in enumerate(sw["gpus_per_task"]):
        for tpn in sw["tasks_per_node"]:
            if g and g * tpn > gpus:
                raise UsageError(
                    f"{source}: sweep.gpus_per_task[{i}]: {tpn} tasks x {g} GPUs do not fit a "
                    f"node of {gpus} GPUs (cluster.gpus_per_node)"
                )
    if SINGLE in sw["backends"]:
        many = [n * t for n in sw["nodes"] for t in sw["tasks_per_node"] if n * t > 1]
        if many:
            raise UsageError(
                f"{source}: sweep.backends: backend {SINGLE!r} runs one process, "
                f"but the sweep has {max(many)} ranks"
            )


def _dataset_size(data: dict) -> tuple[int | None, int]:
    """(images, classes) of the staged dataset when known without reading any file."""
    if data["source"] == kinds.STAGE_SYNTHETIC:
        return (
            data.get("num_samples") or _SYNTHETIC_DEFAULTS[0],
            data.get("num_classes") or _SYNTHETIC_DEFAULTS[1],
        )
    if data["source"] in _KNOWN_SIZES:
        return _KNOWN_SIZES[data["source"]]
    return None, 1


#: Data sources every rank generates itself: nothing is staged, and there is no test split
#: for `scalelab evaluate` (the trainer validates on its own held-out sequences).
GENERATED_SOURCES = kinds.GENERATED_STUDY_SOURCES


def stages_data(cfg: dict) -> bool:
    """Whether the workflow stages data (a generated source generates its test split)."""
    return cfg["data"]["source"] not in GENERATED_SOURCES
