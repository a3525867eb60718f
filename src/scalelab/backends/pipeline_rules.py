"""Pipeline parallelism without torch: the schedules by name, the rules a (pp, v, m) layout
must obey, and the bubble it leaves.

The plan asks :func:`pipeline_problems` for every sweep point while Snakemake parses the
workflow, so this module imports no torch; :mod:`scalelab.backends.pipeline` builds the
stages and schedules these rules describe. The rules are torch's own conditions
(``torch.distributed.pipelining.schedules`` of torch 2.13), stated before any process
exists, plus the layer split this project makes (every stage holds the same number of
blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelab.backends.problem import Problem
from scalelab.backends.registry import REGISTRY, with_capability

__all__ = [
    "PP_MODELS",
    "SCHEDULES",
    "ScheduleSpec",
    "bubble_fraction",
    "microbatch_problems",
    "pipeline_problems",
    "stage_ranks",
]

#: Models that split into pipeline stages by layer (:mod:`scalelab.backends.pipeline`).
PP_MODELS = ("gpt",)


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule: its torch class and its conditions on stages per rank and on m."""

    name: str
    torch_class: str
    #: Stages per rank it runs: None for any number >= 1, else exactly this many.
    virtual_stages: int | None
    #: How stages sit on ranks: ``loop`` (stage s on rank s % pp) or ``v`` (rank r holds
    #: stages r and 2 pp - 1 - r).
    style: str = "loop"
    #: m >= pp (Schedule1F1B's check).
    needs_m_ge_pp: bool = False
    #: m divisible by its rounds, max(1, m // pp) (the interleaved schedules' check).
    needs_rounds: bool = False
    #: Splits backward into input- and weight-gradient work and fills idle slots with
    #: the latter (Qi et al. 2023): (pp - 1) / (v m) is then an upper bound of its bubble.
    zero_bubble: bool = False


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", "ScheduleGPipe", 1),
        ScheduleSpec("1f1b", "Schedule1F1B", 1, needs_m_ge_pp=True),
        ScheduleSpec("interleaved-1f1b", "ScheduleInterleaved1F1B", None, needs_rounds=True),
        ScheduleSpec(
            "interleaved-zero-bubble",
            "ScheduleInterleavedZeroBubble",
            None,
            needs_rounds=True,
            zero_bubble=True,
        ),
        ScheduleSpec("zbv-zero-bubble", "ScheduleZBVZeroBubble", 2, style="v", zero_bubble=True),
    )
}


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def pipeline_problems(
    pp: int,
    v: int,
    m: int,
    schedule: str,
    n_layers: int | None,
    backend: str,
    model: str | None,
    batch: int | None = None,
) -> list[Problem]:
    """Why ``pp`` stages x ``v`` virtual stages per rank with ``m`` micro-batches under
    ``schedule`` cannot run ``model`` (``n_layers`` blocks; None when it has none) on
    ``backend``; one Problem per reason, each naming its field. ``batch`` (optional): the
    samples one pipeline reads per step, which the m micro-batches split evenly. Empty
    when the layout can run; pp = 1 is no pipeline and has no problems of its own."""
    found: list[Problem] = []
    for field, value in (("dist.pp", pp), ("dist.virtual_stages", v), ("dist.microbatches", m)):
        if not _positive(value):
            found.append(Problem(field, f"{value!r} must be an integer >= 1"))
    if found or pp == 1:
        return found
    if schedule not in SCHEDULES:
        return [
            Problem(
                "dist.schedule", f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        ]
    spec = SCHEDULES[schedule]
    refused = with_capability("needs_mpi") + with_capability("single_process")
    if backend in REGISTRY and backend in refused:
        found.append(
            Problem(
                "dist.pp",
                f"pipeline parallelism (pp={pp}) needs a torch.distributed backend, not {backend}",
            )
        )
    if model is not None and model not in PP_MODELS:
        found.append(
            Problem(
                "dist.pp",
                f"model {model!r} does not split into pipeline stages "
                f"(pp > 1 supports: {', '.join(PP_MODELS)})",
            )
        )
    if spec.virtual_stages is not None and v != spec.virtual_stages:
        found.append(
            Problem(
                "dist.virtual_stages",
                f"schedule {schedule} runs {spec.virtual_stages} stage(s) per rank, not {v}",
            )
        )
    stages = pp * v
    if n_layers is not None and n_layers % stages:
        found.append(
            Problem(
                "dist.virtual_stages" if v > 1 else "dist.pp",
                f"the model's {n_layers} layers do not split over pp x v = {pp} x {v} "
                f"= {stages} stages",
            )
        )
    if spec.needs_m_ge_pp and m < pp:
        found.append(
            Problem(
                "dist.microbatches",
                f"schedule {schedule} needs m >= pp = {pp} micro-batches, not {m}",
            )
        )
    rounds = max(1, m // pp)
    if spec.needs_rounds and m % rounds:
        found.append(
            Problem(
                "dist.microbatches",
                f"schedule {schedule} needs m divisible by its rounds max(1, m // pp) = "
                f"{rounds}; m = {m}",
            )
        )
    if batch is not None:
        found += microbatch_problems(m, batch)
    return found


def microbatch_problems(m: int, batch: int) -> list[Problem]:
    """Why ``m`` micro-batches cannot split a pipeline's step of ``batch`` samples (each
    micro-batch must hold the same number, or the loss averages over unequal parts)."""
    if batch % m:
        return [
            Problem(
                "dist.microbatches",
                f"{m} micro-batches do not split the pipeline's batch of {batch} evenly",
            )
        ]
    return []


def stage_ranks(pp: int, v: int, schedule: str) -> list[list[int]]:
    """For each pipeline rank, the stage indices it holds (``pp * v`` stages in all)."""
    if SCHEDULES[schedule].style == "v":
        return [[r, 2 * pp - 1 - r] for r in range(pp)]
    return [[r + k * pp for k in range(v)] for r in range(pp)]


def bubble_fraction(pp: int, v: int, m: int) -> float:
    """The pipeline bubble, idle time over ideal compute time, of ``pp`` stages with ``v``
    virtual stages per rank and ``m`` micro-batches: (pp - 1) / (v m) (Narayanan et al.
    2021, section 2.2)."""
    if not (_positive(pp) and _positive(v) and _positive(m)):
        raise ValueError(f"bubble_fraction(pp={pp}, v={v}, m={m}): each must be an integer >= 1")
    return (pp - 1) / (v * m)
