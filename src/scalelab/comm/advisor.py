"""The layout advisor: every (dp, tp, pp, m, v) layout of a GPT that can exist on a world
size, each predicted by :mod:`scalelab.comm.layout_model`, the best one, and why each of
the others loses.

Which layouts exist is asked of the owners: :meth:`ParallelDims.problems
<scalelab.backends.parallel_dims.ParallelDims.problems>` (tensor parallelism: the heads
split over tp) and :func:`~scalelab.backends.pipeline_rules.pipeline_problems` (the
pipeline: layers over pp x v stages, the schedule's conditions on m, the batch over m
micro-batches). Data parallelism needs the global batch to split evenly over dp; with
pp = 1, m micro-batches are gradient accumulation. tp <= devices per node (Megatron's
advice) is not a rule here: the model prices a tp group that spans nodes on the
inter-node link, and the table says so.

Torch-free (the plan may import it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from scalelab.backends.parallel_dims import ParallelDims, Pipe
from scalelab.backends.registry import DEFAULT
from scalelab.comm.hardware import Profile
from scalelab.comm.layout_model import (
    GPTShape,
    Layout,
    Prediction,
    predict_layout,
    schedule_for,
)
from scalelab.errors import UsageError
from scalelab.units import format_size

#: The backend the advisor's layouts replicate with (Megatron's data parallelism: DDP).
BACKEND = DEFAULT  # the data-parallel default: replication over dp
#: Bounds that keep the enumeration to seconds (a hostile 2**63 would never finish).
MAX_WORLD = 16384
MAX_BATCH = 1 << 24
MAX_DIM = 1 << 20
#: Largest number of candidate layouts predicted.
MAX_CANDIDATES = 400_000


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class Advice:
    """The advisor's answer: the predicted layouts (best per (dp, tp, pp) first, fitting
    ones by step time, then those over memory by memory) and counts."""

    shape: GPTShape
    batch: int
    world_size: int
    hardware: str
    memory_limit: float
    layouts: list[Prediction]
    candidates: int
    over_memory: int
    skipped: list[str] = field(default_factory=list)

    @property
    def best(self) -> Prediction:
        return self.layouts[0]

    def fits(self, p: Prediction) -> bool:
        return p.memory_bytes <= self.memory_limit


def check_inputs(shape: GPTShape, batch: int, world: int) -> None:
    """One UsageError line for a shape, batch or world size the advisor cannot take."""
    for flag, value, top in (
        ("--layers", shape.layers, MAX_DIM),
        ("--hidden", shape.hidden, MAX_DIM),
        ("--heads", shape.heads, MAX_DIM),
        ("--seq", shape.seq, MAX_DIM),
        ("--vocab", shape.vocab, 1 << 24),
        ("--global-batch", batch, MAX_BATCH),
        ("--world-size", world, MAX_WORLD),
    ):
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top):
            raise UsageError(f"{flag}: {value!r} must be an integer in [1, {top}]")
    if shape.hidden % shape.heads:
        raise UsageError(
            f"--hidden: {shape.hidden} is not divisible by the {shape.heads} heads (--heads)"
        )


def layout_problems(shape: GPTShape, batch: int, layout: Layout) -> list[str]:
    """Why ``layout`` cannot run this GPT (empty when it can), from the owners' rules:
    ParallelDims (heads over tp, ranks over tp x pp, the pipeline's schedule, layers and
    m), the batch over dp, and each replica's batch over the m micro-batches."""
    pipe = Pipe(layout.schedule or "1f1b", layout.virtual_stages, layout.microbatches)
    dims = ParallelDims(layout.dp * layout.tp * layout.pp, layout.dp, layout.tp, layout.pp, pipe)
    options = {"n_heads": shape.heads, "n_layers": shape.layers}
    found = [p.line() for p in dims.problems(BACKEND, "gpt", options)]
    if batch % layout.dp:
        found.append(f"field 'batch': {batch} sequences do not split over dp={layout.dp}")
    if found:
        return found
    per_replica = batch // layout.dp
    if per_replica % layout.microbatches:
        found.append(
            f"field 'dist.microbatches': {layout.microbatches} micro-batches do not split "
            f"the replica's batch of {per_replica} evenly"
        )
    return found


def _replica_problems(shape: GPTShape, batch: int, dp: int, tp: int) -> list[str]:
    """What rules out every (m, v) of a (dp, tp) split at once: the heads over tp and the
    batch over dp (the pipeline's rules need m and v: :func:`layout_problems`)."""
    dims = ParallelDims(dp * tp, dp, tp)
    found = [p.line() for p in dims.problems(BACKEND, "gpt", {"n_heads": shape.heads})]
    if batch % dp:
        found.append(f"field 'batch': {batch} sequences do not split over dp={dp}")
    return found


def candidates(
    shape: GPTShape, batch: int, world: int, recompute: tuple[bool, ...]
) -> tuple[list[Layout], list[str]]:
    """Every layout of ``world`` ranks that can exist, and one reason per (dp, tp, pp)
    that cannot (none of its m and v exist)."""
    out: list[Layout] = []
    skipped: list[str] = []
    for tp in divisors(world):
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            found, reason = _schedules(shape, batch, dp, tp, pp, recompute)
            if not found:
                skipped.append(f"dp={dp} tp={tp} pp={pp}: {reason}")
            out += found
            if len(out) > MAX_CANDIDATES:
                raise UsageError(
                    f"--world-size: more than {MAX_CANDIDATES} candidate layouts; "
                    "use a smaller world size or global batch"
                )
    return out, skipped


def _schedules(
    shape: GPTShape, batch: int, dp: int, tp: int, pp: int, recompute: tuple[bool, ...]
) -> tuple[list[Layout], str]:
    """The (m, v, schedule, recomputation) choices of one (dp, tp, pp) that exist, and
    the first reason one did not."""
    split = _replica_problems(shape, batch, dp, tp)
    if split:
        return [], split[0]
    out: list[Layout] = []
    reason = ""
    stages = divisors(shape.layers // pp) if shape.layers % pp == 0 and pp > 1 else [1]
    for m in divisors(batch // dp):
        for v in stages:
            layout = Layout(dp, tp, pp, m, v, schedule_for(pp, v, m))
            problems = layout_problems(shape, batch, layout)
            reason = reason or (problems[0] if problems else "")
            if not problems:
                out += [
                    Layout(dp, tp, pp, m, v, layout.schedule, activation_checkpointing=rc)
                    for rc in recompute
                ]
    return out, reason


def advise(
    shape: GPTShape,
    batch: int,
    world: int,
    hw: Profile,
    hardware: str,
    memory_limit: float | None = None,
    recompute: tuple[bool, ...] = (False, True),
) -> Advice:
    """Predict every layout that exists and rank them; one UsageError line when none
    exists or none fits ``memory_limit`` (default: the profile's memory per device)."""
    check_inputs(shape, batch, world)
    limit = memory_limit if memory_limit is not None else hw.memory_bytes.value
    layouts, skipped = candidates(shape, batch, world, recompute)
    if not layouts:
        why = skipped[0] if skipped else "no layout"
        raise UsageError(
            f"--world-size: no (dp, tp, pp) layout of {world} ranks can run this model "
            f"({len(skipped)} refused; first: {why})"
        )
    predicted = [predict_layout(shape, batch, lay, hw) for lay in layouts]
    fitting = [p for p in predicted if p.memory_bytes <= limit]
    if not fitting:
        least = min(predicted, key=lambda p: p.memory_bytes)
        raise UsageError(
            f"--memory-limit: no layout of {world} ranks fits {format_size(int(limit))} per "
            f"device; the smallest, {describe(least.layout)}, needs "
            f"{format_size(int(least.memory_bytes))}"
        )
    return Advice(
        shape,
        batch,
        world,
        hardware,
        limit,
        best_per_layout(predicted, limit),
        len(predicted),
        len(predicted) - len(fitting),
        skipped,
    )


def best_per_layout(predicted: list[Prediction], limit: float) -> list[Prediction]:
    """The best (m, v, schedule, recomputation) of each (dp, tp, pp): the fastest that fits
    (ties: fewer micro-batches, which the model does not price but GEMMs prefer, then less
    memory), else the one needing least memory; fitting layouts first, by step time."""
    groups: dict[tuple[int, int, int], list[Prediction]] = {}
    for p in predicted:
        groups.setdefault((p.layout.dp, p.layout.tp, p.layout.pp), []).append(p)
    best = []
    for group in groups.values():
        fit = [p for p in group if p.memory_bytes <= limit]
        if fit:
            best.append(min(fit, key=lambda p: (p.step_s, p.layout.microbatches, p.memory_bytes)))
        else:
            best.append(min(group, key=lambda p: p.memory_bytes))
    return sorted(
        best,
        key=lambda p: (
            p.memory_bytes > limit,
            p.step_s if p.memory_bytes <= limit else p.memory_bytes,
        ),
    )


#: The step's parts a loser can lose on, in words.
PARTS = {
    "compute_s": "compute",
    "bubble_s": "bubble",
    "tp_s": "TP all-reduces",
    "p2p_s": "p2p sends",
    "dp_s": "DP all-reduce",
}


def why_loses(p: Prediction, best: Prediction, limit: float) -> str:
    """Why ``p`` loses to ``best``: over memory, or the parts of the step it spends more
    time on, largest first."""
    if p is best:
        return "best"
    if p.memory_bytes > limit:
        return f"over memory: {format_size(int(p.memory_bytes))} > {format_size(int(limit))}"
    extra = {
        name: getattr(p, key) - getattr(best, key)
        for key, name in PARTS.items()
        if getattr(p, key) - getattr(best, key) > 1e-3 * best.step_s
    }
    loss = p.step_s - best.step_s
    parts = ", ".join(
        f"{name} +{_seconds(d)}" for name, d in sorted(extra.items(), key=lambda kv: -kv[1])[:3]
    )
    text = f"+{loss / best.step_s:.1%}: {parts}" if parts else f"+{loss / best.step_s:.2%}"
    if p.layout.activation_checkpointing and "compute" in extra:
        text += " (recomputation)"
    if p.tp_crosses_nodes:
        text += "; TP spans nodes"
    return text


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def describe(layout: Layout) -> str:
    """``dp 4 x tp 8 x pp 16, 1f1b, m=64, v=1, recomputation``."""
    sched = f", {layout.schedule}" if layout.schedule else ""
    rc = ", recomputation" if layout.activation_checkpointing else ""
    return (
        f"dp {layout.dp} x tp {layout.tp} x pp {layout.pp}{sched}, m={layout.microbatches}, "
        f"v={layout.virtual_stages}{rc}"
    )


# ----------------------------------------------------------------------------- output

COLUMNS = (
    ("dp", lambda p: p.layout.dp),
    ("tp", lambda p: p.layout.tp),
    ("pp", lambda p: p.layout.pp),
    ("schedule", lambda p: p.layout.schedule or "-"),
    ("v", lambda p: p.layout.virtual_stages),
    ("m", lambda p: p.layout.microbatches),
    ("b", lambda p: p.micro_batch),
    ("recompute", lambda p: "yes" if p.layout.activation_checkpointing else "no"),
    ("step s", lambda p: f"{p.step_s:.4g}"),
    ("samples/s", lambda p: f"{p.samples_per_s:.4g}"),
    ("TFLOP/s/dev", lambda p: f"{p.model_tflops_per_device:.4g}"),
    ("hw TFLOP/s/dev", lambda p: f"{p.hardware_tflops_per_device:.4g}"),
    ("memory", lambda p: format_size(int(p.memory_bytes))),
    ("bubble", lambda p: f"{p.bubble_fraction:.1%}"),
    ("tp s", lambda p: f"{p.tp_s:.3g}"),
    ("p2p s", lambda p: f"{p.p2p_s:.3g}"),
    ("dp s", lambda p: f"{p.dp_s:.3g}"),
)


def markdown(advice: Advice, hw: Profile, top: int) -> str:
    """The advice as Markdown: the question, the best layout, the table with why each of
    the others loses."""
    s, best = advice.shape, advice.best
    shown = advice.layouts[:top]
    head = [name for name, _ in COLUMNS] + ["why it loses"]
    rows = [
        [str(get(p)) for _, get in COLUMNS] + [why_loses(p, best, advice.memory_limit)]
        for p in shown
    ]
    lines = [
        f"# Layout advice: GPT {s.params() / 1e9:.3g}B on {advice.world_size} x {hw.device}",
        "",
        f"Model: L={s.layers}, h={s.hidden}, a={s.heads}, s={s.seq}, V={s.vocab}; global "
        f"batch {advice.batch}; hardware profile `{advice.hardware}` ({hw.description}); "
        f"memory limit {format_size(int(advice.memory_limit))} per device.",
        "",
        f"**Best: {describe(best.layout)}**: {best.step_s:.4g} s per step, "
        f"{best.samples_per_s:.4g} samples/s, {best.model_tflops_per_device:.4g} model "
        f"TFLOP/s per device ({best.hardware_tflops_per_device:.4g} counting "
        f"recomputation), {format_size(int(best.memory_bytes))} per device.",
        "",
        f"{advice.candidates} candidate layouts predicted, {advice.over_memory} over the "
        f"memory limit; below, the best of each (dp, tp, pp) ({len(shown)} of "
        f"{len(advice.layouts)}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Model: scalelab.comm.layout_model (compute at the profile's achievable FLOP/s, "
        "bubble (pp-1)/(v m), ring all-reduces, p2p sends; nothing overlaps).",
    ]
    return "\n".join(lines) + "\n"


def to_json(advice: Advice, hw: Profile) -> str:
    """The advice as one JSON document (every (dp, tp, pp)'s best, with why it loses)."""
    doc = {
        "ok": True,
        "model": asdict(advice.shape) | {"params": advice.shape.params()},
        "global_batch": advice.batch,
        "world_size": advice.world_size,
        "hardware": advice.hardware,
        "device": hw.device,
        "memory_limit_bytes": advice.memory_limit,
        "candidates": advice.candidates,
        "over_memory": advice.over_memory,
        "best": advice.best.record(),
        "layouts": [
            p.record() | {"why": why_loses(p, advice.best, advice.memory_limit)}
            for p in advice.layouts
        ],
        "refused": advice.skipped,
    }
    return json.dumps(doc, indent=2)
