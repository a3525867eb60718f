"""The workflow configuration: validation against its JSON schema, and sweep expansion.

The schema (src/scalelab/schemas/workflow.schema.yaml, linked from
workflow/schemas/) is the single description of every field. Validation fills
in defaults, then checks what a schema cannot say (fractions that sum to 1,
ranks that fit a node). Every error names the field by its path, e.g.
``sweep.nodes[0]``, so a user finds it in their file at once.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from scalelab.errors import UsageError


@cache
def schema() -> dict:
    text = resources.files("scalelab").joinpath("schemas/workflow.schema.yaml").read_text()
    return yaml.safe_load(text)


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


def validate(config: dict, source: str = "config") -> dict:
    """Return a validated copy of `config` with defaults filled in; UsageError otherwise."""
    import jsonschema

    if not isinstance(config, dict):
        raise UsageError(f"{source}: the configuration must be a mapping")
    cfg = copy.deepcopy(config)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(e.path)))
    if errors:
        err = errors[0]
        where = _path(err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            msg = f"unknown key {extra[0]!r}" if extra else err.message
            where = _path([*err.absolute_path, extra[0]]) if extra else where
        else:
            msg = err.message
        raise UsageError(f"{source}: {where}: {msg}")
    _fill_defaults(cfg, schema())
    _check_semantics(cfg, source)
    return cfg


def _check_semantics(cfg: dict, source: str) -> None:
    split = cfg["data"]["split"]
    if abs(sum(split) - 1.0) > 1e-6:
        raise UsageError(f"{source}: data.split: fractions {split} sum to {sum(split):g}, not 1")
    if cfg["data"]["source"] in ("imagefolder", "npz") and not cfg["data"].get("path"):
        raise UsageError(f"{source}: data.path: required for source {cfg['data']['source']!r}")
    cpus = cfg["cluster"].get("cpus_per_node")
    per_task = cfg["launch"]["cpus_per_task"]
    if cpus:
        for i, tpn in enumerate(cfg["sweep"]["tasks_per_node"]):
            if tpn * per_task > cpus:
                raise UsageError(
                    f"{source}: sweep.tasks_per_node[{i}]: {tpn} tasks x {per_task} CPUs "
                    f"(launch.cpus_per_task) do not fit a node of {cpus} CPUs "
                    f"(cluster.cpus_per_node)")
    gpus = cfg["cluster"]["gpus_per_node"]
    for i, g in enumerate(cfg["sweep"]["gpus_per_task"]):
        for tpn in cfg["sweep"]["tasks_per_node"]:
            if g and g * tpn > gpus:
                raise UsageError(
                    f"{source}: sweep.gpus_per_task[{i}]: {tpn} tasks x {g} GPUs do not fit a "
                    f"node of {gpus} GPUs (cluster.gpus_per_node)")
    if "none" in cfg["sweep"]["backends"]:
        many = [n * t for n in cfg["sweep"]["nodes"] for t in cfg["sweep"]["tasks_per_node"]
                if n * t > 1]
        if many:
            raise UsageError(f"{source}: sweep.backends: backend 'none' runs one process, "
                             f"but the sweep has {max(many)} ranks")


def validate_launch(launch: dict) -> dict:
    """A `launch` section on its own, checked and completed like the workflow's."""
    import jsonschema

    sch = schema()["properties"]["launch"]
    try:
        jsonschema.validate(launch, sch)
    except jsonschema.ValidationError as err:
        raise UsageError(f"launch.{_path(err.absolute_path)}: {err.message}") from None
    out = dict(launch)
    _fill_defaults(out, sch)
    return out


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such configuration file") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return validate(raw or {}, source=str(path))


@dataclass(frozen=True)
class RunPoint:
    """One point of the sweep: one training job."""

    backend: str
    mode: str
    nodes: int
    tasks_per_node: int
    gpus_per_task: int
    repeat: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def run_id(self) -> str:
        """Readable and stable: the same point always gets the same directory."""
        return (f"{self.backend}-{self.mode}-n{self.nodes}-t{self.tasks_per_node}"
                f"-g{self.gpus_per_task}-r{self.repeat}")

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ranks": self.ranks, **asdict(self)}


def expand(cfg: dict) -> list[RunPoint]:
    """Every combination of the sweep lists, in a stable order."""
    s = cfg["sweep"]
    return [
        RunPoint(b, m, n, t, g, r)
        for b, m, n, t, g, r in itertools.product(
            s["backends"], s["modes"], s["nodes"], s["tasks_per_node"], s["gpus_per_task"],
            range(s["repeats"]))
    ]


def find(cfg: dict, run_id: str) -> RunPoint:
    for point in expand(cfg):
        if point.run_id == run_id:
            return point
    raise UsageError(f"run {run_id!r} is not in the sweep of this configuration")


def base_ranks(cfg: dict) -> int:
    """Ranks of the smallest configuration: the reference of weak scaling."""
    return min(p.ranks for p in expand(cfg))
