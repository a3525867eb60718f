"""The plan of a study: its run points, the combinations skipped with their reasons, and
every check that needs a point (batch per point, samples per batch, a timed step).

:func:`plan` is computed once per validated config and process (cached on the config's
sweep and train sections): the Snakefile, ``scalelab plan``, ``scalelab launch`` and the
Slurm resources all ask it, and Snakemake re-parses the workflow inside every job. It
imports no torch: each point's layout (tensor and pipeline parallelism included) is
:class:`~scalelab.backends.parallel_dims.ParallelDims`, whose rules are torch-free.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from scalelab.backends.config import DistConfig
from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.pipeline_rules import bubble_fraction
from scalelab.backends.problem import Problem
from scalelab.backends.registry import DEFAULT
from scalelab.data import kinds
from scalelab.errors import UsageError
from scalelab.study.checks import OPTIONAL_KNOBS, _dataset_size, stages_data
from scalelab.train.batch import check_elastic, resolve_batch
from scalelab.train.config import RunConfig, from_dict
from scalelab.train.timing import epoch_steps, timed_steps

#: The sweep's knobs, in run-id order. A new knob is one entry here, one field of RunPoint
#: and one list in the schema's ``sweep`` section.
KNOBS = (
    "backends",
    "modes",
    "nodes",
    "tasks_per_node",
    "gpus_per_task",
    "tp",
    "pp",
    "microbatches",
    "schedule",
)


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


#: RunPoint's pipeline fields, left out of its job spec where they hold their defaults.
PIPELINE_FIELDS = ("pp", "microbatches", "schedule")


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
    pp: int = 1
    """Pipeline stages per model replica (``sweep.pp``; 1: none)."""
    microbatches: int | None = None
    """Micro-batches per pipeline step (``sweep.microbatches``; None: not swept, or pp = 1)."""
    schedule: str | None = None
    """Pipeline schedule (``sweep.schedule``; None: not swept, or pp = 1)."""

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_task * self.tasks_per_node

    @property
    def run_id(self) -> str:
        """Readable and stable: the same point always gets the same directory. tp = 1 and
        pp = 1 add nothing, so the ids of sweeps without model parallelism are those they
        always had; a pipeline adds its swept m and schedule (``-pp2-m4-gpipe``)."""
        tp = f"-tp{self.tp}" if self.tp != 1 else ""
        pp = f"-pp{self.pp}" if self.pp != 1 else ""
        if self.pp != 1 and self.microbatches is not None:
            pp += f"-m{self.microbatches}"
        if self.pp != 1 and self.schedule is not None:
            pp += f"-{self.schedule}"
        return (
            f"{self.backend}-{self.mode}-n{self.nodes}-t{self.tasks_per_node}"
            f"-g{self.gpus_per_task}{tp}{pp}-r{self.repeat}"
        )

    @property
    def model_parallel(self) -> bool:
        """Whether a replica spans several ranks (tp or pp > 1): not a data-parallel point."""
        return self.tp > 1 or self.pp > 1

    def as_dict(self, full: bool = False) -> dict[str, Any]:
        """The point as a job spec and a run's sweep.json carry it: the pipeline's fields
        only where they differ from no pipeline, so the spec and config digest of a point
        without one stay what they were (its finished run is not trained again); ``full``:
        every field (the plan's listing)."""
        out = {"run_id": self.run_id, "ranks": self.ranks, **asdict(self)}
        if not full:
            for name in PIPELINE_FIELDS:
                if out[name] == RunPoint.__dataclass_fields__[name].default:
                    del out[name]
        return out


@dataclass(frozen=True)
class Skipped:
    """A combination of the sweep's lists that cannot exist, and why."""

    point: RunPoint
    reason: str
    knob: str = "sweep.tp"
    """The sweep list that makes it impossible (``sweep.tp``, ``sweep.pp``, ...)."""

    def as_dict(self) -> dict[str, Any]:
        p = self.point
        return {
            "run_id": p.run_id,
            "backend": p.backend,
            "ranks": p.ranks,
            "tp": p.tp,
            "pp": p.pp,
            "microbatches": p.microbatches,
            "schedule": p.schedule,
            "knob": self.knob,
            "reason": self.reason,
        }


def _combinations(cfg: dict) -> list[RunPoint]:
    """Every combination of the sweep lists, once: a point without a pipeline takes no
    micro-batch count or schedule, so those lists do not multiply it."""
    s = cfg["sweep"]
    points: dict[RunPoint, None] = {}  # ordered and unique
    for b, m, n, t, g, tp, pp, mb, sched, r in itertools.product(
        s["backends"],
        s["modes"],
        s["nodes"],
        s["tasks_per_node"],
        s["gpus_per_task"],
        s.get("tp") or [1],
        s.get("pp") or [1],
        s.get("microbatches") or [None],
        s.get("schedule") or [None],
        range(s["repeats"]),
    ):
        pipe = (mb, sched) if pp > 1 else (None, None)
        points[RunPoint(b, m, n, t, g, r, tp, pp, *pipe)] = None
    return list(points)


def _written_dist(cfg: dict) -> DistConfig:
    """``train.dist`` as written (its defaults where it is not valid: the run-config check
    names that field)."""
    train = cfg.get("train")
    dist = train.get("dist") if isinstance(train, dict) else None
    try:
        return DistConfig.model_validate(dist if isinstance(dist, dict) else {})
    except ValidationError:
        return DistConfig()


def point_dist(cfg: dict, point: RunPoint) -> DistConfig:
    """The ``dist`` section ``point`` runs with, as far as the layout goes: the sweep's
    knobs over ``train.dist`` as written."""
    swept = {
        field: getattr(point, field)
        for knob, field in OPTIONAL_KNOBS.items()
        if cfg["sweep"].get(knob) and getattr(point, field) is not None
    }
    return _written_dist(cfg).model_copy(update=swept)


def point_layout(cfg: dict, point: RunPoint) -> ParallelDims:
    """The layout (:class:`ParallelDims`, its pipeline included) ``point`` runs."""
    return ParallelDims.from_dist(point.ranks, point_dist(cfg, point))


def point_bubble(cfg: dict, point: RunPoint) -> float:
    """The pipeline bubble of ``point`` (:func:`bubble_fraction`; 0 without a pipeline)."""
    dims = point_layout(cfg, point)
    return bubble_fraction(dims.pp, dims.pipe.v, dims.pipe.m)


def _model(cfg: dict) -> tuple[str | None, dict[str, Any] | None]:
    """The model's name and options as written (None where they are not valid)."""
    train = cfg.get("train")
    model = train.get("model") if isinstance(train, dict) else None
    name = model.get("name", "cnn") if isinstance(model, dict) else None
    options = model.get("options") if isinstance(model, dict) else None
    return (
        name if isinstance(name, str) else None,
        options if isinstance(options, dict) else None,
    )


def _layout_problems(cfg: dict, point: RunPoint, dims: ParallelDims) -> list[Problem]:
    """Why ``dims`` cannot run ``point``'s backend and model (the layout's own rules,
    :meth:`ParallelDims.problems`, torch-free except for a GPT with tp > 1), then why a
    replica's batch cannot feed its pipeline."""
    name, options = _model(cfg)
    found = dims.problems(point.backend, name, options, planned=True)
    return found or _batch_problems(cfg, point, dims)


def _batch_problems(cfg: dict, point: RunPoint, dims: ParallelDims) -> list[Problem]:
    """Why the m micro-batches of ``dims`` do not split a replica's step at ``point`` (its
    batch from the trainer's rule, :func:`resolve_batch`, over the data-parallel split
    alone); empty without a pipeline, or where the run config or its batch is refused
    (:func:`check_points` names those)."""
    if dims.pp == 1:
        return []
    try:
        rc = from_dict(run_config(cfg, point, "DATA"), prefix="train.")
        split = ParallelDims.of(point.ranks, dims.tp, dims.pp)  # one micro-batch: no split rule
        batch = resolve_batch(rc, split, prefix="train.").per_rank_batch
    except UsageError:
        return []
    return dims.batch_problems(rc.optim.grad_accum_steps, batch)


def _skip(cfg: dict, point: RunPoint) -> Skipped | None:
    """``point`` as a skipped combination, or None when it can run or when its layout
    is impossible as ``train.dist`` writes it (at the point's ranks and backend): that is
    an explicit choice, so :func:`check_points` refuses it naming the field instead."""
    found = _layout_problems(cfg, point, point_layout(cfg, point))
    if not found:
        return None
    written = ParallelDims.from_dist(point.ranks, _written_dist(cfg))
    if _layout_problems(cfg, point, written):
        return None
    return Skipped(point, found[0].reason, _knob(cfg, found[0]))


def _knob(cfg: dict, problem: Problem) -> str:
    """The sweep list to name for ``problem``: that of its field when the sweep sets it,
    else the first pipeline or tensor-parallel list given."""
    swept = [k for k in ("pp", "tp", "microbatches", "schedule") if cfg["sweep"].get(k)]
    field = problem.field.removeprefix("dist.")
    knob = next((k for k, f in OPTIONAL_KNOBS.items() if f == field and k in swept), None)
    return f"sweep.{knob or (swept[0] if swept else 'tp')}"


class Plan(NamedTuple):
    """The runs of a study and the combinations of its sweep lists that cannot exist.

    Unpacks as ``points, skipped = plan(cfg)``."""

    points: tuple[RunPoint, ...]
    skipped: tuple[Skipped, ...]

    def as_dict(self) -> dict[str, Any]:
        """RESULTS/sweep.json and ``scalelab plan --json``: ``{"runs", "skipped"}``."""
        return {
            "runs": [p.as_dict(full=True) for p in self.points],
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
    cannot exist (``sweep.tp`` or ``sweep.pp`` with horovod, tp x pp not dividing the
    ranks, a model without a tensor-parallel plan or pipeline stages, layers that pp x v
    do not divide, m against the schedule or the batch). An explicitly written single
    point is never skipped: a sweep left without any point is an error naming the list."""
    points, skipped = [], []
    for point in _combinations(cfg):
        skip = _skip(cfg, point)
        if skip is None:
            points.append(point)
        else:
            skipped.append(skip)
    if not points:
        first = skipped[0]
        raise UsageError(
            f"{first.knob}: no point of the sweep can run; {first.point.run_id}: {first.reason}"
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
                f"run {run_id!r}: {skip.knob}: this combination cannot "
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
    for knob, field in OPTIONAL_KNOBS.items():
        if cfg["sweep"].get(knob) and getattr(point, field) is not None:
            dist[field] = getattr(point, field)
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
            batch = resolve_batch(rc, _checked_layout(point, rc), prefix="train.")
            check_elastic(rc, point.tasks_per_node, prefix="train.")
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


def _checked_layout(point: RunPoint, rc: RunConfig) -> ParallelDims:
    """The layout of ``point``'s resolved run config, or one line naming the field that
    makes it impossible: written in ``train.dist``, so an error (a sweep list skips)."""
    dims = ParallelDims.from_dist(point.ranks, rc.dist)
    found = dims.problems(point.backend, rc.model.name, rc.model.options, planned=True)
    if found:
        raise UsageError(found[0].line("train."))
    return dims


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
