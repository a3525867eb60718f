"""Pipeline parallelism for the GPT, applied from outside the model (as :mod:`tp` is).

:func:`split_gpt` cuts a built :class:`~scalelab.models.gpt.GPT` into ``n_stages`` stages by
layer: the token and position embeddings go to the first stage, the final norm and the LM
head to the last, and each stage holds ``n_layers / n_stages`` consecutive blocks. A stage
keeps the GPT's parameter names (``blocks.3.attn.q.weight`` stays ``blocks.3...``), so the
stages' state dicts are pieces of the whole model's. :func:`build_pipeline` makes the
``torch.distributed.pipelining`` stages a rank holds (v per rank for the interleaved and
zero-bubble schedules) and the schedule named by :data:`pipeline_rules.SCHEDULES`, with
the loss (the mean next-token cross-entropy) on the last stage.

The rules (which layouts exist) are torch-free in :mod:`scalelab.backends.pipeline_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.backends.pipeline_rules import SCHEDULES, pipeline_problems, stage_ranks
from scalelab.backends.registry import AUTO
from scalelab.errors import UsageError
from scalelab.models.gpt import GPT


class GPTStage(nn.Module):
    """Blocks ``first..last-1`` of a GPT, with the embeddings when it is the first stage
    and the final norm and head when it is the last. Shares the GPT's modules."""

    def __init__(self, model: GPT, first: int, last: int) -> None:
        super().__init__()
        self.is_first, self.is_last = first == 0, last == model.n_layers
        if self.is_first:
            self.tok, self.pos, self.drop = model.tok, model.pos, model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, last)})
        if self.is_last:
            self.ln, self.head = model.ln, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, activations (B, T, d) elsewhere; logits
        (B, vocab, T) out of the last (the layout :meth:`GPT.forward` returns)."""
        if self.is_first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.drop(self.tok(x) + self.pos(pos))
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            return torch.matmul(self.head.weight, self.ln(x).transpose(1, 2))
        return x


def split_gpt(model: nn.Module, stage: int, n_stages: int) -> GPTStage:
    """Stage ``stage`` of ``n_stages`` of ``model`` (a GPT whose layers split evenly)."""
    if not isinstance(model, GPT):
        raise UsageError(f"field 'dist.pp': {type(model).__name__} does not split into stages")
    if model.n_layers % n_stages:
        raise UsageError(
            f"field 'dist.pp': the model's {model.n_layers} layers do not split over "
            f"{n_stages} stages"
        )
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is not one of {n_stages} stages")
    per = model.n_layers // n_stages
    return GPTStage(model, stage * per, (stage + 1) * per)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loop's loss: mean next-token cross-entropy over (B, vocab, T) logits."""
    return F.cross_entropy(logits, target)


@dataclass
class Pipeline:
    """What one rank runs: its stage modules, their torch stages and the schedule."""

    modules: list[GPTStage]
    stages: list[Any]
    schedule: Any
    microbatches: int

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.modules)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.modules)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under the whole GPT's names."""
        return [(n, p) for m in self.modules for n, p in m.named_parameters()]

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        """One forward and backward of the whole batch, split into the schedule's m
        micro-batches; gradients accumulate in the stages' parameters (averaged over the
        micro-batches). The rank holding the first stage reads the tokens ``x``, the one
        holding the last the targets ``y`` (other ranks may pass None); that rank gets the
        mean loss, others None. A batch that m does not split evenly is refused."""
        m = self.microbatches
        for batch in (x, y):  # every rank that passes the batch refuses it alike
            if batch is not None and batch.shape[0] % m:
                raise UsageError(
                    f"field 'dist.microbatches': {m} micro-batches do not split the "
                    f"pipeline's batch of {batch.shape[0]} evenly"
                )
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        target = y if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses)
        if not self.has_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()


def build_pipeline(
    model: nn.Module,
    pp_rank: int,
    pp: int,
    v: int,
    m: int,
    schedule: str,
    device: torch.device,
    group: Any = None,
) -> Pipeline:
    """The stages ``pp_rank`` of ``pp`` holds (``v`` each, :func:`stage_ranks`) and the
    schedule ``schedule`` over ``m`` micro-batches, on the process ``group`` of the
    pipeline (the world when None). Every rank of the group calls it with the same model
    (built from the same seed)."""
    from torch.distributed import pipelining

    n_layers = model.n_layers if isinstance(model, GPT) else None
    found = pipeline_problems(pp, v, m, schedule, n_layers, AUTO, "gpt")
    if not isinstance(model, GPT):
        found.insert(0, f"field 'dist.pp': {type(model).__name__} does not split into stages")
    if found:
        raise UsageError(found[0])
    spec = SCHEDULES[schedule]
    n_stages = pp * v
    modules = [split_gpt(model, s, n_stages) for s in stage_ranks(pp, v, schedule)[pp_rank]]
    stages = [
        pipelining.PipelineStage(mod.to(device), s, n_stages, device, group=group)
        for mod, s in zip(modules, stage_ranks(pp, v, schedule)[pp_rank], strict=True)
    ]
    cls = getattr(pipelining, spec.torch_class)
    if spec.virtual_stages == 1:
        sched = cls(stages[0], n_microbatches=m, loss_fn=lm_loss)
    else:
        sched = cls(stages, n_microbatches=m, loss_fn=lm_loss)
    return Pipeline(modules, stages, sched, m)
