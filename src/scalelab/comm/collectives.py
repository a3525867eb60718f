"""The collectives each backend issues per optimizer step, and their alpha-beta time.

``predict`` models DDP as one ring allreduce of the gradients. Sharded and tensor
parallelism issue other collectives, in other numbers:

- **ddp**: one allreduce of the gradient bytes G (bucketed; counted here as one).
- **fsdp** (FSDP2, one shard group per block plus the root, group g holding S_g bytes):
  forward all-gathers every group; backward all-gathers again every group but the
  root when parameters are resharded after forward (the root is kept); one
  reduce-scatter of each group's gradients per synchronized micro-batch.
  So 2G - 1 all-gathers and G reduce-scatters (G groups) per step without
  accumulation; ZeRO-3's 1.5x DDP's bytes.
- **tp** (Megatron split of a GPT block over t ranks, as scalelab.models.gpt_shapes.TP_PLAN):
  forward allreduces the outputs of the two row-wise linears (attention out, MLP
  proj); backward allreduces the input gradients of the four column-wise linears
  (q, k, v, fc: separate linears, each input gradient reduced on its own): 6
  allreduces of B_local x T x d activations per block per micro-batch.

Times use the ring algorithm's alpha-beta costs (Thakur, Rabenseifner & Gropp 2005):
allreduce 2(n-1) alpha + 2(n-1)/n S/beta; all-gather and reduce-scatter (n-1) alpha +
(n-1)/n S/beta, with S the whole (unsharded) buffer. The counts are checked against
what torch really issues (CommDebugMode) in tests/test_sharding_comm.py, and their
byte volume in tests/test_predict_collectives.py; ``scalelab predict`` times them
(:class:`scalelab.comm.predict.CommModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelab.models.gpt_shapes import TP_PLAN


@dataclass(frozen=True)
class Collective:
    """``count`` collectives ``op`` of ``size_bytes`` each over ``ranks`` ranks."""

    op: str  # allreduce | all_gather | reduce_scatter
    count: int
    size_bytes: float
    ranks: int

    def seconds(self, alpha_s: float, beta_Bps: float) -> float:
        """Ring-algorithm time of all ``count`` collectives (0 on one rank)."""
        n = self.ranks
        if n <= 1 or self.count == 0:
            return 0.0
        steps = 2 * (n - 1) if self.op == "allreduce" else n - 1
        return self.count * (steps * alpha_s + steps / n * self.size_bytes / beta_Bps)


def ddp_step(grad_bytes: float, dp: int) -> list[Collective]:
    """DDP: one gradient allreduce per optimizer step."""
    return [Collective("allreduce", 1, grad_bytes, dp)]


def fsdp_step(
    group_bytes: list[float],
    dp: int,
    reshard_after_forward: bool = True,
    accum_steps: int = 1,
    param_scale: float = 1.0,
) -> list[Collective]:
    """FSDP2 per optimizer step; ``group_bytes``: fp32 bytes per shard group, root LAST.

    Every micro-batch gathers the parameters (``param_scale`` 0.5: bf16 mixed
    precision); only the last one reduce-scatters the gradients (fp32 reduction).
    """
    out = []
    for i, size in enumerate(group_bytes):
        root = i == len(group_bytes) - 1
        gathers = 1 + (0 if root or not reshard_after_forward else 1)
        out.append(Collective("all_gather", gathers * accum_steps, size * param_scale, dp))
        out.append(Collective("reduce_scatter", 1, size, dp))
    return out


def tp_step(
    n_layers: int,
    tokens_per_rank: int,
    d_model: int,
    tp: int,
    act_bytes: int = 4,
    accum_steps: int = 1,
) -> list[Collective]:
    """Tensor parallelism per optimizer step: 2 forward + 4 backward allreduces of the
    block's activations (``tokens_per_rank`` = per-rank batch x seq_len, whole step)."""
    size = tokens_per_rank / accum_steps * d_model * act_bytes
    return [Collective("allreduce", 6 * n_layers * accum_steps, size, tp)]


def counts(collectives: list[Collective]) -> dict[str, int]:
    """Number of collectives per op (what CommDebugMode reports)."""
    out: dict[str, int] = {}
    for c in collectives:
        out[c.op] = out.get(c.op, 0) + c.count
    return out


def step_seconds(collectives: list[Collective], alpha_s: float, beta_Bps: float) -> float:
    """Communication time of one step if nothing overlapped with compute."""
    return sum(c.seconds(alpha_s, beta_Bps) for c in collectives)


def tp_local_bytes(module, tp: int = 1, prefix: str = "") -> float:
    """Bytes of ``module``'s parameters one tensor-parallel rank holds: the weights (and
    column-wise biases) that :data:`scalelab.models.gpt_shapes.TP_PLAN` splits count 1/tp, the
    rest (embeddings, norms, row-wise biases) in full. ``prefix``: the module's path
    inside a block (TP_PLAN's names are relative to a block)."""
    total = 0.0
    for name, p in module.named_parameters():
        full = f"{prefix}{name}"
        owner, _, leaf = full.rpartition(".")
        owner = owner.split(".", 2)[-1] if owner.startswith("blocks.") else owner
        style = TP_PLAN.get(owner) if tp > 1 else None
        split = style == "colwise" or (style == "rowwise" and leaf == "weight")
        total += p.numel() * p.element_size() / (tp if split else 1)
    return total


def fsdp_groups(model, tp: int = 1) -> list[float]:
    """Bytes of each FSDP shard group of ``model`` (per block, then the root's rest),
    as :class:`scalelab.backends.fsdp.FSDPBackend` wraps it; with ``tp`` > 1, of one
    tensor-parallel rank's part (what FSDP shards over the dp dimension)."""
    from scalelab.backends.fsdp import blocks_of

    blocks = [tp_local_bytes(parent[i], tp, "blocks.0.") for parent, i in blocks_of(model)]
    return [*blocks, tp_local_bytes(model, tp) - sum(blocks)]
