"""The workflow configuration: validation, sweep expansion, and every check done at plan time.

:func:`validate` is what the workflow's common.smk calls when Snakemake builds the
DAG, before anything is staged, logged or submitted. It checks, in order:

1. the JSON schema (src/scalelab/schemas/workflow.schema.yaml, linked from
   workflow/schemas/): types, enums, bounds, unknown keys (with a "did you mean");
2. numbers are finite, paths and names use a safe character set (every string that
   can reach sbatch, srun or apptainer), extra sbatch/srun options are ``--opt=value``
   list items;
3. the sweep is bounded (``sweep.max_points``) and fits the cluster;
4. every sweep point's resolved run config through the one run-config definition
   (:mod:`scalelab.train.config`, pydantic): types, ranges, the batch divisible by the
   point's ranks x accumulation, enough samples for one batch, non-empty splits.

Every error is one line naming the field path (and the sweep point where it depends on
one), e.g. ``config: sweep point ddp-strong-n3-t1-g0-r0: field
'train.optim.global_batch_size': 32 is not divisible by world_size * grad_accum_steps =
3 * 1``. The checks are cheap (no dataset walks, no torch import): Snakemake re-parses
the workflow inside every job.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import os
import re
import shlex
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from scalelab.errors import UsageError

#: The sweep's knobs, in run-id order. A new knob is one entry here, one field of RunPoint
#: and one list in the schema's ``sweep`` section.
KNOBS = ("backends", "modes", "nodes", "tasks_per_node", "gpus_per_task", "tp")

#: Rules that run as Slurm jobs under --profile slurm (effective_config runs locally).
SLURM_RULES = ("stage", "train", "evaluate", "commbench", "analyze", "predict")

#: Rules where a retry can help: training resumes from its newest checkpoint after a
#: preemption or a node failure; commbench is a fresh measurement. The others are
#: deterministic (a second try fails the same way), so they never retry.
RETRYABLE_RULES = ("train", "commbench")

# Characters allowed in config values that become paths or names on a command line.
_PATH_CHARS = "letters, digits and . _ / + = : @ % , ~ -"
_PATH_RE = re.compile(r"[A-Za-z0-9._/+=:@%,~-]")
_NAME_CHARS = "letters, digits and . _ - ,"
_NAME_RE = re.compile(r"[A-Za-z0-9._,-]")
_CONSTRAINT_CHARS = "letters, digits and . _ - , & | * [ ]"
_CONSTRAINT_RE = re.compile(r"[A-Za-z0-9._,&|*\[\]-]")
_OPTION_RE = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9._/+=:@%,~-]+)?$")

#: sbatch options the slurm plugin or this workflow sets itself: not allowed in slurm_extra.
_MANAGED_SBATCH = ("job-name", "output", "error", "parsable", "export", "comment", "workdir",
                   "chdir", "account", "partition", "mem", "mem-per-cpu", "ntasks",
                   "ntasks-per-node", "ntasks-per-gpu", "cpus-per-task", "cpus-per-gpu", "time",
                   "constraint", "qos", "nodes", "clusters", "gres", "gpus", "gpus-per-task",
                   "gpus-per-node", "wrap")


@cache
def schema() -> dict:
    text = resources.files("scalelab").joinpath("schemas/workflow.schema.yaml").read_text()
    return yaml.safe_load(text)


def full_schema() -> dict:
    """The workflow schema with the run config's generated schema as its ``train`` section."""
    from scalelab.train.config import json_schema

    out = copy.deepcopy(schema())
    run = json_schema()
    out["$defs"] = run.pop("$defs")
    run.pop("$schema", None)
    out["properties"]["train"] = {**run, "description": out["properties"]["train"]["description"]}
    return out


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _fill_defaults(node: dict, sch: dict) -> None:
    """Set schema defaults for missing keys, recursing into objects."""
    for key, sub in sch.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and "properties" in sub:
            if key not in node:
                node[key] = {}
            if isinstance(node[key], dict):
                _fill_defaults(node[key], sub)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config: dict, source: str = "config") -> dict:
    """Return a validated copy of `config` with defaults filled in; UsageError otherwise.

    This is the one entry point the workflow uses (common.smk) and the tests exercise.
    """
    if not isinstance(config, dict):
        raise UsageError(f"{source}: the configuration must be a mapping")
    cfg = copy.deepcopy(config)
    _check_finite(cfg, [], source)
    validator = _validator_class()(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(e.path)))
    if errors:
        err = errors[0]
        where = _path(err.absolute_path)
        if err.validator == "additionalProperties":
            known = err.schema.get("properties", {})
            extra = sorted(set(err.instance) - set(known))
            if extra:
                where = _path([*err.absolute_path, extra[0]])
                msg = f"unknown key {extra[0]!r}{_did_you_mean(extra[0], known)}"
            else:
                msg = err.message
        else:
            msg = err.message
        raise UsageError(f"{source}: {where}: {msg}".replace("\n", " "))
    _fill_defaults(cfg, schema())
    _check_strings(cfg, source)
    _check_semantics(cfg, source)
    _check_size(cfg, source)
    try:
        plan(cfg)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None
    check_points(cfg, source)
    return cfg


@cache
def _validator_class():
    """Draft 2020-12 where ``integer`` means an int: the draft also accepts 1.0, which
    then reaches ``range()`` (a traceback) or a command line (``mpirun -n 2.0``)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(base, type_checker=checker)


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


def _check_chars(value: str, where: str, allowed: re.Pattern, described: str, what: str,
                 source: str) -> None:
    for ch in value:
        if not allowed.fullmatch(ch):
            raise UsageError(f"{source}: {where}: character {ch!r} is not allowed in {what} "
                             f"(allowed: {described})")


def check_path(value: str, where: str, source: str = "config") -> None:
    """A path that reaches a command line: safe characters, not empty, no leading '-'."""
    if not value:
        raise UsageError(f"{source}: {where}: must not be empty")
    _check_chars(value, where, _PATH_RE, _PATH_CHARS, "a path", source)
    if value.startswith("-"):
        raise UsageError(f"{source}: {where}: a path must not start with '-' (it would read "
                         f"as an option)")


#: What a study ships (README, Snakefile and these directories): never an output.
STUDY_DIRS = (".git", ".snakemake", ".test", "benchmarks", "config", "containers", "docs",
              "envs", "profiles", "slurm", "src", "tests", "workflow")


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
        raise UsageError(f"{source}: results: {value!r} is {why}; give a directory of its "
                         f"own for the outputs (e.g. results)")


def check_option(value: str, where: str, source: str = "config") -> None:
    """One extra command-line option: ``--name`` or ``--name=value`` with safe characters."""
    if not _OPTION_RE.match(value):
        bad = next((c for c in value if not _PATH_RE.fullmatch(c)), None)
        why = f"character {bad!r} is not allowed" if bad else "expected --option or --option=value"
        raise UsageError(f"{source}: {where}: {why} (one list item per option, "
                         f"e.g. --cpu-bind=cores)")


def _check_strings(cfg: dict, source: str) -> None:
    """Every config string that can reach sbatch, srun, apptainer or a job's shell."""
    paths = [("results", cfg["results"]), ("data.path", cfg["data"]["path"]),
             ("data.scratch", cfg["data"]["scratch"]), ("container.image",
                                                         cfg["container"]["image"])]
    paths += [(f"analysis.from_csv[{i}]", p) for i, p in enumerate(cfg["analysis"]["from_csv"])]
    paths += [(f"container.binds[{i}]", p) for i, p in enumerate(cfg["container"]["binds"])]
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
        _check_chars(ifname, "launch.socket_ifname", re.compile(r"[A-Za-z0-9._:^,-]"),
                     "letters, digits and . _ : ^ , -", "an interface name", source)
    res = cfg["resources"]
    for where, section in [("resources", res),
                           *((f"resources.rules.{r}", s) for r, s in res["rules"].items())]:
        _check_site(section, where, source)


def _check_site(section: dict, where: str, source: str) -> None:
    for key in ("slurm_partition", "slurm_account", "qos"):
        if section.get(key) is not None:
            _check_chars(section[key], f"{where}.{key}", _NAME_RE, _NAME_CHARS, "a Slurm name",
                         source)
    if section.get("constraint") is not None:
        _check_chars(section["constraint"], f"{where}.constraint", _CONSTRAINT_RE,
                     _CONSTRAINT_CHARS, "a constraint", source)
    for i, opt in enumerate(section.get("slurm_extra") or []):
        item = f"{where}.slurm_extra[{i}]"
        check_option(opt, item, source)
        name = opt[2:].split("=", 1)[0]
        if name in _MANAGED_SBATCH:
            raise UsageError(f"{source}: {item}: --{name} is set by the workflow (use the "
                             f"resources keys, the sweep or the cluster section instead)")


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

#: Images of the sources whose size is known without reading them.
_KNOWN_SIZES = {"digits": (1797, 10)}
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
    from scalelab.train.config import TOKEN_MODELS

    model = cfg["train"].get("model")
    name = model.get("name", "cnn") if isinstance(model, dict) else "cnn"
    data = cfg["data"]["source"]
    if name in TOKEN_MODELS and data not in GENERATED_SOURCES:
        raise UsageError(f"{source}: train.model.name: model {name!r} trains on token "
                         f"sequences, but data.source {data!r} is images (use data.source: "
                         f"tokens)")
    if name not in TOKEN_MODELS and data in GENERATED_SOURCES and isinstance(name, str):
        raise UsageError(f"{source}: train.model.name: model {name!r} trains on images, but "
                         f"data.source {data!r} is token sequences (use model gpt)")


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
            raise UsageError(f"{source}: data.split[{i}]: the {_SPLIT_NAMES[i]} fraction must "
                             f"be > 0 (an empty {_SPLIT_NAMES[i]} split cannot be "
                             f"{'trained on' if i == 0 else 'measured'})")
    _check_data_path(data, source)
    if data["source"] in GENERATED_SOURCES:
        for key in _STAGING_ONLY:
            if data.get(key):
                raise UsageError(
                    f"{source}: data.{key}: not used by source {data['source']!r}, which every "
                    f"rank generates: nothing is staged or copied")
    total, classes = _dataset_size(data)
    if total is not None:
        for i in (1, 2):
            if total * split[i] / classes < 0.5:
                raise UsageError(
                    f"{source}: data.split[{i}]: {split[i]:g} of {total} images over {classes} "
                    f"classes leaves the {_SPLIT_NAMES[i]} split empty (stratified per class)")


def _check_data_path(data: dict, source: str) -> None:
    if data["source"] in ("imagefolder", "npz"):
        if not data.get("path"):
            raise UsageError(f"{source}: data.path: required for source {data['source']!r}")
        if not os.path.exists(data["path"]):
            raise UsageError(f"{source}: data.path: no such "
                             f"{'directory' if data['source'] == 'imagefolder' else 'file'}: "
                             f"{data['path']}")
    elif data.get("path"):
        raise UsageError(f"{source}: data.path: only used by the imagefolder and npz sources, "
                         f"not {data['source']!r}")


def _check_owned(cfg: dict, source: str) -> None:
    """Run-config fields the workflow sets itself may not be written in ``train``."""
    train = cfg["train"]
    if not isinstance(train, dict):
        raise UsageError(f"{source}: train: expected a mapping")
    owned = dict(_WORKFLOW_OWNED)
    if cfg["sweep"].get("tp"):
        owned[("dist", "tp")] = "sweep.tp"
    for (section, key), owner in owned.items():
        if isinstance(train.get(section), dict) and key in train[section]:
            raise UsageError(f"{source}: train.{section}.{key}: set by the workflow from "
                             f"{owner}; remove it here")


def _check_fits_cluster(cfg: dict, source: str) -> None:
    sw, cl = cfg["sweep"], cfg["cluster"]
    cpus = cl.get("cpus_per_node")
    per_task = cfg["launch"]["cpus_per_task"]
    for i, tpn in enumerate(sw["tasks_per_node"]):
        if cpus and tpn * per_task > cpus:
            raise UsageError(
                f"{source}: sweep.tasks_per_node[{i}]: {tpn} tasks x {per_task} CPUs "
                f"(launch.cpus_per_task) do not fit a node of {cpus} CPUs "
                f"(cluster.cpus_per_node)")
    for i, n in enumerate(sw["nodes"]):
        if cl.get("nodes") and n > cl["nodes"]:
            raise UsageError(f"{source}: sweep.nodes[{i}]: {n} nodes, but the cluster has "
                             f"{cl['nodes']} (cluster.nodes)")
    gpus = cl["gpus_per_node"]
    for i, g in enumerate(sw["gpus_per_task"]):
        for tpn in sw["tasks_per_node"]:
            if g and g * tpn > gpus:
                raise UsageError(
                    f"{source}: sweep.gpus_per_task[{i}]: {tpn} tasks x {g} GPUs do not fit a "
                    f"node of {gpus} GPUs (cluster.gpus_per_node)")
    if "none" in sw["backends"]:
        many = [n * t for n in sw["nodes"] for t in sw["tasks_per_node"] if n * t > 1]
        if many:
            raise UsageError(f"{source}: sweep.backends: backend 'none' runs one process, "
                             f"but the sweep has {max(many)} ranks")


def _dataset_size(data: dict) -> tuple[int | None, int]:
    """(images, classes) of the staged dataset when known without reading any file."""
    if data["source"] == "synthetic":
        return (data.get("num_samples") or _SYNTHETIC_DEFAULTS[0],
                data.get("num_classes") or _SYNTHETIC_DEFAULTS[1])
    if data["source"] in _KNOWN_SIZES:
        return _KNOWN_SIZES[data["source"]]
    return None, 1


def _check_size(cfg: dict, source: str) -> None:
    """Bound the sweep before expanding it: `repeats: 100000000` must not fill the memory."""
    sw = cfg["sweep"]
    factors = {f"sweep.{k}": len(sw[k]) for k in KNOBS if k in sw}
    factors["sweep.repeats"] = sw["repeats"]
    total = math.prod(factors.values())
    if total > sw["max_points"]:
        knob = max(factors, key=factors.get)
        raise UsageError(
            f"{source}: {knob}: the sweep has {total} points ("
            + " x ".join(f"{v} {k.split('.')[1]}" for k, v in factors.items())
            + f"), more than sweep.max_points={sw['max_points']}; shrink {knob} "
            f"({factors[knob]}) or raise sweep.max_points")


# --------------------------------------------------------------------------- points

@dataclass(frozen=True)
class RunPoint:
    """One point of the sweep: one training job."""

    backend: str
    mode: str
    nodes: int
    tasks_per_node: int
    gpus_per_task: int
    repeat: int
    tp: int = 1
    """Tensor-parallel ranks per model replica (``sweep.tp``; 1: none)."""

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_task * self.tasks_per_node

    @property
    def run_id(self) -> str:
        """Readable and stable: the same point always gets the same directory. tp = 1 adds
        nothing, so the ids of sweeps without tensor parallelism are those they always had."""
        tp = f"-tp{self.tp}" if self.tp != 1 else ""
        return (f"{self.backend}-{self.mode}-n{self.nodes}-t{self.tasks_per_node}"
                f"-g{self.gpus_per_task}{tp}-r{self.repeat}")

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ranks": self.ranks, **asdict(self)}


@dataclass(frozen=True)
class Skipped:
    """A combination of the sweep's lists that cannot exist, and why."""

    point: RunPoint
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.point.run_id, "backend": self.point.backend,
                "ranks": self.point.ranks, "tp": self.point.tp, "reason": self.reason}


def _combinations(cfg: dict) -> list[RunPoint]:
    s = cfg["sweep"]
    return [
        RunPoint(b, m, n, t, g, r, tp)
        for b, m, n, t, g, tp, r in itertools.product(
            s["backends"], s["modes"], s["nodes"], s["tasks_per_node"], s["gpus_per_task"],
            s.get("tp") or [1], range(s["repeats"]))
    ]


def _tp_problem(point: RunPoint, model: str | None,
                options: dict[str, Any] | None = None) -> str | None:
    """Why ``point``'s tensor-parallel layout cannot exist, or None (tp = 1 always can).

    The rule is the fsdp backend's own check (:func:`scalelab.backends.fsdp.check_tp`),
    imported only for sweeps with tp > 1: it brings torch, and Snakemake re-parses the
    workflow inside every job."""
    if point.tp == 1:
        return None
    from scalelab.backends.fsdp import check_tp

    try:
        check_tp(point.backend, point.ranks, point.tp, model, options)
    except UsageError as exc:
        # the backend's words are about a started job; here it is a planned point
        return str(exc).replace("field 'dist.tp': ", "").replace("the launcher started",
                                                                  "this point has")
    return None


def plan(cfg: dict) -> tuple[list[RunPoint], list[Skipped]]:
    """The sweep's points in a stable order, and the combinations skipped because they
    cannot exist (``sweep.tp`` with horovod, tp not dividing the ranks, a model without a
    tensor-parallel plan). An explicitly written single point is never skipped: a sweep
    left without any point is an error naming ``sweep.tp``."""
    train = cfg.get("train")
    model = train.get("model") if isinstance(train, dict) else None
    name = model.get("name", "cnn") if isinstance(model, dict) else None
    options = model.get("options") if isinstance(model, dict) else None
    points, skipped = [], []
    for point in _combinations(cfg):
        why = _tp_problem(point, name if isinstance(name, str) else None,
                          options if isinstance(options, dict) else None)
        if why is None:
            points.append(point)
        else:
            skipped.append(Skipped(point, why))
    if not points:
        first = skipped[0]
        raise UsageError(f"sweep.tp: no point of the sweep can run; "
                         f"{first.point.run_id}: {first.reason}")
    return points, skipped


def expand(cfg: dict) -> list[RunPoint]:
    """Every combination of the sweep lists that can exist, in a stable order."""
    return plan(cfg)[0]


def skipped(cfg: dict) -> list[Skipped]:
    """The combinations of the sweep lists that cannot exist (see :func:`plan`)."""
    return plan(cfg)[1]


def plan_summary(cfg: dict) -> str:
    """What the workflow prints when it starts: the runs, and every skipped combination."""
    points, skips = plan(cfg)
    lines = [f"sweep: {len(points)} training run(s)"
             + (f"; {len(skips)} combination(s) skipped, they cannot exist:" if skips else "")]
    lines += [f"  skipped {s.point.run_id}: {s.reason}" for s in skips]
    return "\n".join(lines)


def find(cfg: dict, run_id: str) -> RunPoint:
    points, skips = plan(cfg)
    for point in points:
        if point.run_id == run_id:
            return point
    for skip in skips:
        if skip.point.run_id == run_id:
            raise UsageError(f"run {run_id!r}: sweep.tp: this combination cannot "
                             f"exist and is skipped: {skip.reason}")
    raise UsageError(f"run {run_id!r} is not in the sweep of this configuration")


#: Data sources every rank generates itself: nothing is staged, and there is no test split
#: for `scalelab evaluate` (the trainer validates on its own held-out sequences).
GENERATED_SOURCES = ("tokens",)


def stages_data(cfg: dict) -> bool:
    """Whether the workflow stages data (a generated source generates its test split)."""
    return cfg["data"]["source"] not in GENERATED_SOURCES


def base_ranks(cfg: dict) -> int:
    """Ranks of the smallest configuration: the reference of weak scaling."""
    s = cfg["sweep"]
    return min(s["nodes"]) * min(s["tasks_per_node"])


def run_config(cfg: dict, point: RunPoint, data_dir: str | Path) -> dict:
    """The `scalelab train` config of one sweep point (a plain dict, not yet validated)."""
    rc = copy.deepcopy(cfg["train"])
    dist = rc.setdefault("dist", {})
    dist["backend"] = point.backend
    if cfg["sweep"].get("tp"):
        dist["tp"] = point.tp
    dist["timeout_s"] = cfg["launch"]["timeout_s"]
    if cfg["launch"].get("socket_ifname"):
        dist["socket_ifname"] = cfg["launch"]["socket_ifname"]
    data = rc.setdefault("data", {})
    if not stages_data(cfg):
        # Generated on every rank (train.data sizes it): nothing staged, nothing to copy.
        data["source"] = cfg["data"]["source"]
    else:
        data["source"] = "staged"
        data["path"] = str(data_dir)
    if cfg["data"]["node_local"] and stages_data(cfg):
        data["localize"] = True
        if cfg["data"]["scratch"]:
            data["scratch"] = cfg["data"]["scratch"]
    rc.setdefault("train", {})["threads"] = cfg["launch"]["cpus_per_task"]
    optim = rc.setdefault("optim", {})
    if not isinstance(optim, dict):
        return rc  # the run-config check names train.optim
    base = base_ranks(cfg)
    if point.mode == "strong" and optim.get("per_rank_batch_size"):
        # Strong scaling fixes the global batch: that of the smallest configuration.
        optim["global_batch_size"] = optim.pop("per_rank_batch_size") * base
    elif point.mode == "weak" and isinstance(optim.get("global_batch_size"), int):
        # Weak scaling fixes the batch per rank: that of the smallest configuration.
        scaled = optim["global_batch_size"] * point.ranks / base
        if scaled != int(scaled):
            raise UsageError(
                f"field 'train.optim.global_batch_size': {optim['global_batch_size']} x "
                f"{point.ranks}/{base} ranks is not a whole batch")
        optim["global_batch_size"] = int(scaled)
    return rc


def check_points(cfg: dict, source: str = "config") -> None:
    """Validate every sweep point's resolved run config (cheap: no file is read).

    The base run config is checked once, so a typo is reported without a sweep point;
    what depends on the point (batch divisibility, samples per batch) names the point.
    """
    from scalelab.train.config import Parallelism, from_dict, resolve_batch

    points = expand(cfg)
    try:
        written = copy.deepcopy(cfg["train"])
        if not stages_data(cfg) and isinstance(written.setdefault("data", {}), dict):
            written["data"]["source"] = cfg["data"]["source"]  # generated: the run's source
        from_dict(written, prefix="train.")  # as written
        from_dict(run_config(cfg, points[0], "DATA"), prefix="train.")
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None
    total, classes = _dataset_size(cfg["data"])
    train_max = None if total is None else math.floor(total * cfg["data"]["split"][0]) + classes
    seen: dict[str, None] = {}
    for point in points:
        key = point.run_id.rsplit("-r", 1)[0]  # repeats share a config
        if key in seen:
            continue
        seen[key] = None
        try:
            rc = from_dict(run_config(cfg, point, "DATA"), prefix="train.")
            if point.ranks % rc.dist.tp:
                raise UsageError(f"field 'train.dist.tp': {point.ranks} ranks do not split "
                                 f"into tensor-parallel groups of {rc.dist.tp}")
            why = _tp_problem(replace(point, tp=rc.dist.tp), rc.model.name, rc.model.options)
            if why:  # written in train.dist.tp: explicit, so an error (sweep.tp skips)
                raise UsageError(f"field 'train.dist.tp': {why}")
            batch = resolve_batch(rc, Parallelism(point.ranks, rc.dist.tp), prefix="train.")
            if train_max is not None and batch.global_batch > train_max:
                raise UsageError(
                    f"field 'train.optim.global_batch_size': a global batch of "
                    f"{batch.global_batch} is larger than the training split (about "
                    f"{train_max - classes} of {total} images at data.split[0]="
                    f"{cfg['data']['split'][0]:g})")
        except UsageError as exc:
            raise UsageError(f"{source}: sweep point {point.run_id}: {exc}") from None


# --------------------------------------------------------------------------- resources

def rule_settings(cfg: dict, rule: str) -> dict[str, Any]:
    """Site settings and limits of one rule: the resources section, then its per-rule
    override (resources.rules.RULE), then the retry policy."""
    res = cfg["resources"]
    keys = ("slurm_partition", "slurm_account", "constraint", "qos", "slurm_extra",
            "mem_mb_per_cpu", "runtime")
    out = {k: res.get(k) for k in keys}
    if rule != "train":
        # runtime and memory of the top level are those of the (large) training jobs.
        out["runtime"], out["mem_mb_per_cpu"] = res["small_runtime"], res["small_mem_mb_per_cpu"]
    out["retries"] = res["retries"] if rule in RETRYABLE_RULES else 0
    if rule == "commbench":
        # Placed like the training it predicts: the training jobs' placement overrides
        # apply to it too (its own override, below, still wins).
        train = res["rules"].get("train", {})
        out.update({k: train[k] for k in _PLACEMENT if train.get(k) is not None})
    out.update({k: v for k, v in res["rules"].get(rule, {}).items() if v is not None})
    return out


#: Where a job runs (as opposed to how long and how big it is).
_PLACEMENT = ("slurm_partition", "slurm_account", "constraint", "qos", "slurm_extra")


def slurm_resources(cfg: dict, rule: str) -> dict[str, Any]:
    """The slurm executor plugin's resources for `rule`: only the keys the config sets."""
    s = rule_settings(cfg, rule)
    out = {k: s[k] for k in ("slurm_partition", "slurm_account", "constraint", "qos")
           if s[k] is not None}
    if s["slurm_extra"]:
        # The plugin pastes slurm_extra into a shell command: every item was checked
        # (--option=value, safe characters) and is quoted here once more.
        out["slurm_extra"] = " ".join(shlex.quote(o) for o in s["slurm_extra"])
    out["runtime"] = s["runtime"]
    out["mem_mb_per_cpu"] = s["mem_mb_per_cpu"]
    return out


def gpu_gres(point: RunPoint) -> str | None:
    """The per-node GPU request of a point (sbatch and srun ``--gres``), or None on CPU.

    All ranks of a node share all of that node's GPUs (``--gres=gpu:G`` per node, no
    ``--gpus-per-task``): per-task binding hides the other GPUs of the node from each rank,
    and NCCL's intra-node paths (P2P/NVLink, CUDA IPC) need to see them. Each rank then
    takes the GPU of its local rank.
    """
    return f"gpu:{point.gpus_per_node}" if point.gpus_per_task else None


def point_resources(point: RunPoint, cfg: dict, rule: str) -> dict:
    """Resources of one job for Snakemake's slurm executor plugin (None: leave unset).

    * 1 rank: no ``mpi`` resource. The plugin then runs the job under its own
      ``srun -n1`` step, and ``scalelab launch`` runs the rank directly inside it.
      (The plugin refuses ``mpi`` jobs with one task.)
    * N ranks: ``mpi`` set, so the rule's command runs in the batch script and starts the
      ranks itself with srun; sbatch gets ``--nodes``, ``--ntasks`` and, in slurm_extra,
      ``--ntasks-per-node`` so every node holds the same number of ranks.
    * GPUs: ``--gres=gpu:G`` per node (see :func:`gpu_gres`) and ``tasks_per_gpu=0``,
      without which the plugin adds ``--ntasks-per-gpu=<tasks>``, contradicting the gres.
    """
    site = slurm_resources(cfg, rule)
    extra = [site.pop("slurm_extra")] if site.get("slurm_extra") else []
    if point.ranks > 1:
        extra.append(f"--ntasks-per-node={point.tasks_per_node}")
    gres = gpu_gres(point)
    return {
        **{k: None for k in ("slurm_partition", "slurm_account", "constraint", "qos")},
        **site,
        "mpi": "srun" if point.ranks > 1 else None,
        "nodes": point.nodes,
        "tasks": point.ranks,
        "cpus_per_task": cfg["launch"]["cpus_per_task"],
        "gres": gres,
        "tasks_per_gpu": 0 if gres else None,
        "slurm_extra": " ".join(extra) or None,
    }


def commbench_point(cfg: dict) -> RunPoint:
    """The layout commbench measures: that of the sweep's largest training point (nodes,
    ranks per node, GPUs), with at least 2 ranks so there is something to communicate."""
    points = expand(cfg)
    largest = max(points, key=lambda p: (p.ranks, p.nodes, p.gpus_per_task))
    tpn = max(largest.tasks_per_node, 2 if largest.nodes == 1 else 1)
    return RunPoint("ddp", "strong", largest.nodes, tpn, largest.gpus_per_task, 0)


def load(path: str | Path, allow_yte: bool = False) -> dict:
    """Read a workflow config through the one document loader and validate it.

    ``__use_yte__`` is refused unless ``allow_yte`` (the user trusts the config's code);
    then it is evaluated as Snakemake would, so the plan shows what Snakemake will run."""
    from scalelab import docload

    raw = docload.load(path)
    if docload.uses_yte(raw):
        if not allow_yte:
            docload.refuse_yte(raw, str(path), YTE_HINT_PLAN)
        import yte

        raw = yte.process_yaml(docload.decode(docload.read_bytes(path, str(path)), str(path)),
                               require_use_yte=True)
    return validate(raw, source=str(path))


#: How to accept a YTE config, in `--plan` and in the workflow.
YTE_HINT_PLAN = "pass --allow-yte if you trust its author"
YTE_ENV = "SCALELAB_ALLOW_YTE"
YTE_HINT_WORKFLOW = f"set {YTE_ENV}=1 if you trust its author"


def check_study_dir(path: str | Path, where: str = "study directory",
                    source: str = "workflow") -> None:
    """The study's own path reaches job scripts like every config path (Snakemake writes
    ``--home`` and ``--snakefile`` from it under ``--sdm apptainer``, quoted with Python's
    repr: a ``'`` in it lets ``$(...)`` run), so it gets the same safe character set."""
    text = str(path)
    for ch in text:
        if not _PATH_RE.fullmatch(ch):
            raise UsageError(
                f"{source}: {where} {text!r}: character {ch!r} is not allowed in a path "
                f"(allowed: {_PATH_CHARS}); rename or move the study")


def preflight(default_configfile: str | Path, cli_configfiles: list, snakefile_dir: str | Path,
              workdir: str | Path | None = None) -> None:
    """What the Snakefile runs before its ``configfile:`` line: the study's paths, and
    every config file read by the one document loader (duplicate keys, alias bombs,
    encodings, YTE) before Snakemake's own loader uses it. Files given with
    ``--configfile`` were already read by Snakemake (a YTE one has run), so this stops
    the workflow there; the default config is checked before Snakemake reads it."""
    from scalelab import docload

    check_study_dir(os.path.abspath(workdir or os.getcwd()))
    check_study_dir(os.path.abspath(snakefile_dir), "Snakefile directory")
    files = [Path(p) for p in cli_configfiles]
    if Path(default_configfile).exists():
        files.insert(0, Path(default_configfile))
    allow = os.environ.get(YTE_ENV) == "1"
    for path in files:
        doc = docload.load(path)
        if not allow:
            docload.refuse_yte(doc, str(path), YTE_HINT_WORKFLOW)


def workflow_preflight(workflow: Any, default_configfile: str) -> None:
    """:func:`preflight` from the Snakefile: one line and exit 2 on a bad study or file."""
    import sys

    try:
        preflight(default_configfile, list(workflow.overwrite_configfiles or []),
                  workflow.basedir)
    except UsageError as exc:
        print(f"scalelab workflow: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def validate_launch(launch: dict) -> dict:
    """A `launch` section on its own, checked and completed like the workflow's."""
    import jsonschema

    sch = schema()["properties"]["launch"]
    try:
        jsonschema.validate(launch, sch, cls=_validator_class())
    except jsonschema.ValidationError as err:
        raise UsageError(f"launch.{_path(err.absolute_path)}: {err.message}") from None
    out = dict(launch)
    _fill_defaults(out, sch)
    return out


def workflow_schema_copy() -> str:
    """workflow/schemas/config.schema.yaml: the package's workflow schema as a regular
    file (a symbolic link into src/ dangles in a study copied as the README says)."""
    text = resources.files("scalelab").joinpath("schemas/workflow.schema.yaml").read_text()
    return ("# Generated from src/scalelab/schemas/workflow.schema.yaml by\n"
            "# `python -m scalelab.sweep --write-schemas`: edit that file, not this copy.\n"
            + text)


def write_schemas(root: Path) -> list[Path]:
    """Write the generated run-config schema and the workflow schema's copy into
    workflow/schemas/ (for editors, `snakemake.utils.validate` and a shared study); a
    test checks the committed copies are current."""
    import json

    from scalelab.train.config import json_schema

    out = root / "workflow" / "schemas" / "run.schema.json"
    out.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    mirror = root / "workflow" / "schemas" / "config.schema.yaml"
    mirror.unlink(missing_ok=True)  # never write through a link
    mirror.write_text(workflow_schema_copy())
    return [out, mirror]


def print_plan(path: str, allow_yte: bool = False) -> int:
    """``python -m scalelab.sweep --plan CONFIG [--allow-yte]``: the runs and the skipped
    combinations, without Snakemake (exit 2 and one line for a bad config or a study
    directory outside the safe character set, like the workflow)."""
    import sys

    try:
        check_study_dir(os.getcwd())
        cfg = load(path, allow_yte=allow_yte)
    except UsageError as exc:
        print(f"scalelab sweep: error: {exc}", file=sys.stderr)
        return 2
    print(plan_summary(cfg))
    for point in expand(cfg):
        print(f"  run {point.run_id}: {point.ranks} rank(s)"
              + (f", tp={point.tp}" if point.tp > 1 else ""))
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-schemas"]:
        for p in write_schemas(Path(__file__).resolve().parents[2]):
            print(p)
    elif sys.argv[1:2] == ["--plan"] and sys.argv[3:] in ([], ["--allow-yte"]) and len(
            sys.argv) > 2:
        sys.exit(print_plan(sys.argv[2], allow_yte=sys.argv[3:] == ["--allow-yte"]))
    else:
        print("usage: python -m scalelab.sweep --plan CONFIG [--allow-yte] | --write-schemas",
              file=sys.stderr)
        sys.exit(2)
