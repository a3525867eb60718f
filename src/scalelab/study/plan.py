"""The plan of a study: its run points, the combinations skipped with their reasons, and
every check that needs a point (batch per point, samples per batch, a timed step).

:func:`plan` is computed once per validated config and process (cached on the config's
sweep and train sections): the Snakefile, ``scalelab plan``, ``scalelab launch`` and the
Slurm resources all ask it, and Snakemake re-parses the workflow inside every job. It
imports no torch for a sweep without tensor parallelism.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.registry import DEFAULT
from scalelab.data import kinds
from scalelab.errors import UsageError
from scalelab.study.checks import _dataset_size, stages_data
from scalelab.train.config import from_dict, resolve_batch
from scalelab.train.timing import epoch_steps, timed_steps

#: The sweep's knobs, in run-id order. A new knob is one entry here, one field of RunPoint
#: and one list in the schema's ``sweep`` section.
KNOBS = ("backends", "modes", "nodes", "tasks_per_node", "gpus_per_task", "tp")


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
            f"({factors[knob]}) or raise sweep.max_points"
        )


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
        return (
            f"{self.backend}-{self.mode}-n{self.nodes}-t{self.tasks_per_node}"
            f"-g{self.gpus_per_task}{tp}-r{self.repeat}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ranks": self.ranks, **asdict(self)}


@dataclass(frozen=True)
class Skipped:
    """A combination of the sweep's lists that cannot exist, and why."""

    point: RunPoint
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.point.run_id,
            "backend": self.point.backend,
            "ranks": self.point.ranks,
            "tp": self.point.tp,
            "reason": self.reason,
        }


def _combinations(cfg: dict) -> list[RunPoint]:
    s = cfg["sweep"]
    return [
        RunPoint(b, m, n, t, g, r, tp)
        for b, m, n, t, g, tp, r in itertools.product(
            s["backends"],
            s["modes"],
            s["nodes"],
            s["tasks_per_node"],
            s["gpus_per_task"],
            s.get("tp") or [1],
            range(s["repeats"]),
        )
    ]


def _tp_problem(
    point: RunPoint, model: str | None, options: dict[str, Any] | None = None
) -> str | None:
    """Why ``point``'s tensor-parallel layout cannot exist, or None (tp = 1 always can):
    the layout's own rule (:meth:`scalelab.backends.parallel_dims.ParallelDims.problems`),
    torch-free except for a GPT with tp > 1."""
    found = ParallelDims.of(point.ranks, point.tp).problems(
        point.backend, model, options, planned=True
    )
    return found[0].reason if found else None


class Plan(NamedTuple):
    """The runs of a study and the combinations of its sweep lists that cannot exist.

    Unpacks as ``points, skipped = plan(cfg)``."""

    points: tuple[RunPoint, ...]
    skipped: tuple[Skipped, ...]

    def as_dict(self) -> dict[str, Any]:
        """RESULTS/sweep.json and ``scalelab plan --json``: ``{"runs", "skipped"}``."""
        return {
            "runs": [p.as_dict() for p in self.points],
            "skipped": [s.as_dict() for s in self.skipped],
        }


#: Plans computed in this process, by their config's sweep and train sections.
_PLANS: dict[str, Plan] = {}
#: How many plans this process computed (a test holds a Snakemake parse to one).
computed = 0


def plan(cfg: dict) -> Plan:
    """The plan of a validated config, computed once per process and config (the same
    sweep and train sections give the same plan)."""
    global computed
    key = json.dumps([cfg.get("sweep"), cfg.get("train")], sort_keys=True, default=repr)
    found = _PLANS.get(key)
    if found is None:
        found = _compute(cfg)
        computed += 1
        if len(_PLANS) >= 16:
            _PLANS.clear()
        _PLANS[key] = found
    return found


def _compute(cfg: dict) -> Plan:
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
        why = _tp_problem(
            point,
            name if isinstance(name, str) else None,
            options if isinstance(options, dict) else None,
        )
        if why is None:
            points.append(point)
        else:
            skipped.append(Skipped(point, why))
    if not points:
        first = skipped[0]
        raise UsageError(
            f"sweep.tp: no point of the sweep can run; {first.point.run_id}: {first.reason}"
        )
    return Plan(tuple(points), tuple(skipped))


def expand(cfg: dict) -> list[RunPoint]:
    """Every combination of the sweep lists that can exist, in a stable order."""
    return list(plan(cfg).points)


def skipped(cfg: dict) -> list[Skipped]:
    """The combinations of the sweep lists that cannot exist (see :func:`plan`)."""
    return list(plan(cfg).skipped)


def plan_summary(cfg: dict) -> str:
    """What the workflow prints when it starts: the runs, and every skipped combination."""
    points, skips = plan(cfg)
    lines = [
        f"sweep: {len(points)} training run(s)"
        + (f"; {len(skips)} combination(s) skipped, they cannot exist:" if skips else "")
    ]
    lines += [f"  skipped {s.point.run_id}: {s.reason}" for s in skips]
    return "\n".join(lines)


def find(cfg: dict, run_id: str) -> RunPoint:
    points, skips = plan(cfg)
    for point in points:
        if point.run_id == run_id:
            return point
    for skip in skips:
        if skip.point.run_id == run_id:
            raise UsageError(
                f"run {run_id!r}: sweep.tp: this combination cannot "
                f"exist and is skipped: {skip.reason}"
            )
    raise UsageError(f"run {run_id!r} is not in the sweep of this configuration")


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
    # A generated source keeps its name (every rank makes it, train.data sizes it: nothing
    # staged, nothing to copy); every other trains on what was staged.
    data["source"] = kinds.run_source(cfg["data"]["source"])
    if stages_data(cfg):
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
                f"{point.ranks}/{base} ranks is not a whole batch"
            )
        optim["global_batch_size"] = int(scaled)
    return rc


def check_points(cfg: dict, source: str = "config") -> None:
    """Validate every sweep point's resolved run config (cheap: no file is read).

    The base run config is checked once, so a typo is reported without a sweep point;
    what depends on the point (batch divisibility, samples per batch) names the point.
    """

    points = expand(cfg)
    try:
        written = copy.deepcopy(cfg["train"])
        if not stages_data(cfg) and isinstance(written.setdefault("data", {}), dict):
            written["data"]["source"] = kinds.run_source(cfg["data"]["source"])  # generated
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
            why = _tp_problem(replace(point, tp=rc.dist.tp), rc.model.name, rc.model.options)
            if why:  # written in train.dist.tp: explicit, so an error (sweep.tp skips)
                raise UsageError(f"field 'train.dist.tp': {why}")
            batch = resolve_batch(rc, ParallelDims.of(point.ranks, rc.dist.tp), prefix="train.")
            if train_max is not None and batch.global_batch > train_max:
                raise UsageError(
                    f"field 'train.optim.global_batch_size': a global batch of "
                    f"{batch.global_batch} is larger than the training split (about "
                    f"{train_max - classes} of {total} images at data.split[0]="
                    f"{cfg['data']['split'][0]:g})"
                )
            # generated: the run's own count; staged: the split's upper bound (never refuses
            # a point that would be timed); unknown (imagefolder, npz): not checked here.
            samples = rc.data.num_samples if not stages_data(cfg) else train_max
            if samples is not None:
                _check_timed(rc, batch.global_batch, samples)
        except UsageError as exc:
            raise UsageError(f"{source}: sweep point {point.run_id}: {exc}") from None


#: A point with fewer timed steps than this measures nothing: refused at plan time.
MIN_TIMED_STEPS = 1


def _check_timed(rc: Any, global_batch: int, samples: int) -> None:
    """A point must leave a timed step after the warm-up (the trainer's own rules: steps
    per epoch and which steps are timed, :mod:`scalelab.train.timing`), or its run has
    no samples/s and the scaling analysis loses the point after it ran."""

    steps = epoch_steps(samples, global_batch, rc.train.steps_per_epoch)
    timed = timed_steps(steps, rc.train.epochs, rc.metrics.warmup_steps)
    if timed < MIN_TIMED_STEPS:
        raise UsageError(
            f"field 'train.optim.global_batch_size': a global batch of {global_batch} gives "
            f"{steps} step(s) per epoch (over {samples} training samples) x "
            f"{rc.train.epochs} epoch(s), all within the warm-up "
            f"(train.metrics.warmup_steps={rc.metrics.warmup_steps}"
            + (", and the first of several epochs is not timed" if rc.train.epochs > 1 else "")
            + "): no timed step; lower the batch or the warm-up, or raise train.train.epochs "
            "or the data"
        )


def commbench_point(cfg: dict) -> RunPoint:
    """The layout commbench measures: that of the sweep's largest training point (nodes,
    ranks per node, GPUs), with at least 2 ranks so there is something to communicate."""
    points = expand(cfg)
    largest = max(points, key=lambda p: (p.ranks, p.nodes, p.gpus_per_task))
    tpn = max(largest.tasks_per_node, 2 if largest.nodes == 1 else 1)
    return RunPoint(DEFAULT, "strong", largest.nodes, tpn, largest.gpus_per_task, 0)
