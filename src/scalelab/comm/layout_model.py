"""An analytic model of one training step of a GPT at a (dp, tp, pp, v, m) layout.

For a Megatron-style GPT (L layers, hidden h, a heads, sequence s, vocabulary V, word
embedding tied to the output layer) with global batch B on a declared hardware profile
(:mod:`scalelab.comm.hardware`), per rank of the slowest pipeline stage::

    compute  = stage FLOPs / (peak x achievable fraction)
               stage FLOPs = B/dp x s x (L/pp x layer FLOPs per token + [last] 6 V h) / tp,
               the FLOPs per token from models/flops.py (6 N + 12 L s h), x 4/3 on the
               blocks with full recomputation (one more forward)
    tp       = m x L/pp x (4, or 6 recomputing) ring all-reduces of b s h activations
               over the tp group (Megatron: 2 in forward, 2 in backward per layer)
    p2p      = 2 m v sends of b s h activations (forward, and their gradients back),
               each alpha + bytes/beta on the stage boundary's link
    bubble   = (pp - 1) / (v m) x (compute + tp + p2p)   (pipeline_rules.bubble_fraction)
    dp       = one ring all-reduce of the stage's gradients over the dp group
    step     = compute + tp + p2p + bubble + dp   (nothing overlaps)

with b = B / (dp m) samples per micro-batch. A collective's link follows the rank layout
of :class:`~scalelab.backends.parallel_dims.ParallelDims`: a group on one node runs on
the intra-node link; a group spanning nodes with k members on a node gets k / (devices
per node) of that node's inter-node bandwidth (the other groups of the node share the
rest), at most the intra-node bandwidth. Ring costs are
:class:`~scalelab.comm.collectives.Collective`'s.

Memory per rank (the larger of the first and the last stage): weights, gradients and
optimizer state (the profile's precision; bf16: 2 + 2 + 12 bytes per parameter, the ZeRO
paper's mixed-precision Adam) of the stage's L/pp layers / tp plus the word embedding
(first stage: and the position embedding; last stage: the tied copy), and activations
(Korthikanti et al. 2022, tensor parallelism without sequence parallelism): per layer and
micro-batch s b h (10 + 24/t + 5 a s / (h t)) bytes at 16-bit, or 2 s b h with full
recomputation plus one layer's full activations while it is recomputed; times the
micro-batches in flight on the first stage (GPipe m, 1F1B min(m, pp), interleaved
pp + (pp - 1) / v, Korthikanti's factor 1 + (pp - 1)/(pp v) on 1F1B's pp); the last
stage adds the fp32 logits, 4 s b V / t.

Not modelled: overlap of any communication with compute, GEMM efficiency falling at small
micro-batches, the embedding's and the loss's own collectives, Megatron's scatter-gather
of p2p sends over the tp ranks, the optimizer step's time, and memory fragmentation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import cache

from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.pipeline_rules import SCHEDULES, bubble_fraction
from scalelab.comm.collectives import Collective
from scalelab.comm.hardware import Profile
from scalelab.models.flops import TRAIN_PER_FORWARD, lm_train_flops_per_token

#: Megatron's all-reduces per transformer layer and micro-batch over the tp group: after
#: the attention and the MLP in forward (g), and their conjugates in backward (f)
#: (Shoeybi et al. 2019, figure 4). Full recomputation repeats the forward's two.
TP_ALLREDUCES = {"forward": 2, "backward": 2}
#: Korthikanti et al. 2022, activations of one layer at 16-bit: s b h (10 + 24/t + 5as/(ht)).
ACT_CONST, ACT_SPLIT, ACT_ATTN = 10, 24, 5
#: Bytes a layer keeps per s b h element with full recomputation (its 16-bit input).
ACT_RECOMPUTE = 2
#: Bytes per s b V element of the last stage's logits (fp32, Korthikanti's 4 s b V / t).
LOGIT_BYTES = 4


@dataclass(frozen=True)
class GPTShape:
    """The GPT's dimensions (Megatron's notation: L, h, a, s, V)."""

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int

    def layer_params(self) -> float:
        """Parameters of one block: 12 h^2 weights + 13 h biases and norms."""
        return 12.0 * self.hidden**2 + 13.0 * self.hidden

    def params(self) -> float:
        """All parameters (tied embedding): Narayanan et al. 2021's eq. 2,
        12 L h^2 (1 + 13/(12 h) + (V + s)/(12 L h))."""
        return self.layers * self.layer_params() + (self.vocab + self.seq) * self.hidden

    def layer_flops_per_token(self, recompute: bool) -> float:
        """Training FLOPs of one block per token (with recomputation: one more forward)."""
        flops = lm_train_flops_per_token(12.0 * self.hidden**2, 1, self.seq, self.hidden)
        return flops * (1 + 1 / TRAIN_PER_FORWARD) if recompute else flops

    def head_flops_per_token(self) -> float:
        """Training FLOPs of the output layer per token (6 V h)."""
        return lm_train_flops_per_token(float(self.vocab * self.hidden), 0, self.seq, 0)

    def model_flops(self, batch: int) -> float:
        """Training FLOPs of one step of ``batch`` sequences, without recomputation
        (the FLOPs MFU counts)."""
        n = 12.0 * self.layers * self.hidden**2 + self.vocab * self.hidden
        per_token = lm_train_flops_per_token(n, self.layers, self.seq, self.hidden)
        return per_token * batch * self.seq

    def layer_activation_bytes(self, micro: int, tp: int, recompute: bool) -> float:
        """Activation bytes one layer keeps for one micro-batch of ``micro`` sequences at
        16-bit (Korthikanti et al. 2022, without sequence parallelism)."""
        sbh = self.seq * micro * self.hidden
        if recompute:
            return ACT_RECOMPUTE * sbh
        attn = ACT_ATTN * self.heads * self.seq / (self.hidden * tp)
        return sbh * (ACT_CONST + ACT_SPLIT / tp + attn)


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel layout, the schedule and the recomputation choice."""

    dp: int
    tp: int
    pp: int
    microbatches: int
    virtual_stages: int = 1
    schedule: str | None = None
    activation_checkpointing: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def dims(self) -> ParallelDims:
        return ParallelDims(self.world_size, self.dp, self.tp, self.pp)


@dataclass(frozen=True)
class Prediction:
    """The predicted step of one layout: times (s), memory (bytes), rates."""

    layout: Layout
    micro_batch: int
    compute_s: float
    tp_s: float
    p2p_s: float
    bubble_s: float
    dp_s: float
    bubble_fraction: float
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    dp_allreduce_bytes: float
    tp_crosses_nodes: bool
    p2p_crosses_nodes: bool
    dp_crosses_nodes: bool
    step_s: float
    samples_per_s: float
    model_tflops_per_device: float
    hardware_tflops_per_device: float

    @property
    def memory_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def record(self) -> dict:
        """A flat JSON-ready dict (the layout's fields first)."""
        out = asdict(self.layout) | {k: v for k, v in asdict(self).items() if k != "layout"}
        return out | {"memory_bytes": self.memory_bytes}


# ----------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Net:
    """The links of a hardware profile, hashable (the link analysis of a layout is cached)."""

    per_node: int
    intra: tuple[float, float]
    inter: tuple[float, float]

    @classmethod
    def of(cls, hw: Profile) -> Net:
        """(latency s, bandwidth B/s) of each link; the inter-node bandwidth per node."""
        return cls(
            hw.devices_per_node.value,
            (hw.intra_node.latency_s.value, hw.intra_node.bandwidth_Bps.value),
            (hw.inter_node.latency_s.value, hw.inter_node.bandwidth_Bps.value),
        )


@dataclass(frozen=True)
class Links:
    """The worst link each kind of group of a layout runs on: (alpha s, beta B/s, spans
    nodes); ``wrap``: the interleaved schedule's extra boundary, last stage to first."""

    tp: tuple[float, float, bool]
    dp: tuple[float, float, bool]
    p2p: tuple[float, float, bool]
    wrap: tuple[float, float, bool]


def _group_link(groups: dict[int, dict[int, int]], net: Net) -> tuple[float, float, bool]:
    """The slowest link of ``groups`` (group -> node -> members) under the module doc's
    rule."""
    worst = (*net.intra, False)
    for nodes in groups.values():
        if len(nodes) == 1:
            continue
        share = net.inter[1] * min(nodes.values()) / net.per_node
        link = (net.inter[0], min(share, net.intra[1]), True)
        if (link[1], -link[0]) < (worst[1], -worst[0]):
            worst = link
    return worst


def _p2p_link(crosses: bool, net: Net) -> tuple[float, float, bool]:
    """A stage boundary's link: a pair on two nodes sends at one device's share of its
    node's inter-node bandwidth (all ranks of a stage send at once)."""
    return (net.inter[0], net.inter[1] / net.per_node, True) if crosses else (*net.intra, False)


@cache
def links(dp: int, tp: int, pp: int, net: Net) -> Links:
    """The links of the layout's tp groups, dp groups and stage boundaries, from the rank
    layout ParallelDims owns (one pass over the ranks)."""
    dims = ParallelDims(dp * tp * pp, dp, tp, pp)
    node_of: dict[tuple[int, int, int], int] = {}
    tp_groups: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    dp_groups: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for r in range(dims.world_size):
        c = dims.coords(r)
        node = r // net.per_node
        node_of[(c["pp"], c["dp"], c["tp"])] = node
        tp_groups[c["pp"] * dp + c["dp"]][node] += 1
        dp_groups[c["pp"] * tp + c["tp"]][node] += 1
    crosses = [
        any(node_of[(a, d, t)] != node_of[(b, d, t)] for d in range(dp) for t in range(tp))
        for a, b in [(i, i + 1) for i in range(pp - 1)] + [(pp - 1, 0)]
    ]
    return Links(
        tp=_group_link(tp_groups, net),
        dp=_group_link(dp_groups, net),
        p2p=_p2p_link(any(crosses[:-1]), net),
        wrap=_p2p_link(crosses[-1] and pp > 1, net),
    )


# ----------------------------------------------------------------------------- the step


def in_flight(layout: Layout) -> float:
    """Micro-batches whose activations the first stage holds at its peak (module doc)."""
    m, pp, v = layout.microbatches, layout.pp, layout.virtual_stages
    if pp == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if v > 1:
        return min(float(m), pp + (pp - 1) / v)
    return float(min(m, pp))


def stage_params(shape: GPTShape, tp: int, pp: int) -> tuple[float, float]:
    """Parameters one rank holds on the first and on the last stage."""
    blocks = shape.layers / pp * shape.layer_params() / tp
    words = shape.vocab * shape.hidden / tp
    first = blocks + words + shape.seq * shape.hidden
    last = blocks + words if pp > 1 else first
    return first, last


def _memory(shape: GPTShape, layout: Layout, micro: int, hw: Profile) -> dict[str, float]:
    """Weights, gradients, optimizer state and activations of the fuller stage."""
    tp, pp, rc = layout.tp, layout.pp, layout.activation_checkpointing
    scale = hw.bytes_of("act_bytes") / 2  # Korthikanti's bytes are at 16-bit
    layer = shape.layer_activation_bytes(micro, tp, rc) * scale
    working = shape.layer_activation_bytes(micro, tp, False) * scale if rc else 0.0
    logits = LOGIT_BYTES * shape.seq * micro * shape.vocab / tp
    per_rank_layers = shape.layers / pp
    last_flight = in_flight(layout) if layout.schedule != "1f1b" else 1.0
    acts_first = per_rank_layers * layer * in_flight(layout) + working + (logits if pp == 1 else 0)
    acts_last = per_rank_layers * layer * last_flight + working + logits
    first, last = stage_params(shape, tp, pp)
    stages = [(first, acts_first), (last, acts_last)]
    params, acts = max(stages, key=lambda s: s[0] * _state_bytes(hw) + s[1])
    return {
        "weights_bytes": params * hw.bytes_of("weight_bytes"),
        "grads_bytes": params * hw.bytes_of("grad_bytes"),
        "optimizer_bytes": params * hw.bytes_of("optimizer_bytes"),
        "activations_bytes": acts,
    }


def _state_bytes(hw: Profile) -> int:
    return sum(hw.bytes_of(k) for k in ("weight_bytes", "grad_bytes", "optimizer_bytes"))


def predict_layout(shape: GPTShape, batch: int, layout: Layout, hw: Profile) -> Prediction:
    """The predicted step of ``layout`` for ``batch`` sequences per step on ``hw``
    (the layout must exist: see :mod:`scalelab.comm.advisor`)."""
    dp, tp, pp, m, v = layout.dp, layout.tp, layout.pp, layout.microbatches, layout.virtual_stages
    rc = layout.activation_checkpointing
    micro = batch // (dp * m)
    tokens = batch // dp * shape.seq
    stage_flops = tokens * (shape.layers / pp * shape.layer_flops_per_token(rc))
    stage_flops = (stage_flops + tokens * shape.head_flops_per_token()) / tp
    compute = stage_flops / hw.achievable_flops()
    link = links(dp, tp, pp, Net.of(hw))
    hop = min(link.p2p, link.wrap, key=lambda x: x[1]) if v > 1 else link.p2p
    act = micro * shape.seq * shape.hidden * hw.bytes_of("act_bytes")
    per_layer = TP_ALLREDUCES["forward"] * (2 if rc else 1) + TP_ALLREDUCES["backward"]
    count = int(per_layer * shape.layers / pp * m)
    tp_s = Collective("allreduce", count, act, tp).seconds(*link.tp[:2])
    p2p = 2 * m * v * (hop[0] + act / hop[1]) if pp > 1 else 0.0
    bubble = bubble_fraction(pp, v, m)
    busy = compute + tp_s + p2p
    mem = _memory(shape, layout, micro, hw)
    grads = max(stage_params(shape, tp, pp)) * hw.bytes_of("grad_bytes")
    dp_s = Collective("allreduce", 1, grads, dp).seconds(*link.dp[:2])
    step = busy * (1 + bubble) + dp_s
    world = layout.world_size
    hardware_flops = (
        batch
        * shape.seq
        * (shape.layers * shape.layer_flops_per_token(rc) + shape.head_flops_per_token())
    )
    return Prediction(
        layout=layout,
        micro_batch=micro,
        compute_s=compute,
        tp_s=tp_s,
        p2p_s=p2p,
        bubble_s=busy * bubble,
        dp_s=dp_s,
        bubble_fraction=bubble,
        **mem,
        dp_allreduce_bytes=grads,
        tp_crosses_nodes=link.tp[2] and tp > 1,
        p2p_crosses_nodes=hop[2] and pp > 1,
        dp_crosses_nodes=link.dp[2] and dp > 1,
        step_s=step,
        samples_per_s=batch / step,
        model_tflops_per_device=shape.model_flops(batch) / step / world / 1e12,
        hardware_tflops_per_device=hardware_flops / step / world / 1e12,
    )


def schedule_for(pp: int, v: int, m: int) -> str | None:
    """The schedule the advisor tries for (pp, v, m): none without a pipeline, the
    interleaved 1F1B with v > 1, 1F1B where m >= pp, else GPipe (whose bubble is the
    same (pp - 1)/m and which allows m < pp). The zero-bubble schedules are left out: the
    bubble formula does not describe them."""
    if pp == 1:
        return None
    if v > 1:
        return "interleaved-1f1b"
    return "1f1b" if m >= pp and "1f1b" in SCHEDULES else "gpipe"
