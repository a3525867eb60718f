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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalelab.backends.pipeline_rules import (
    SCHEDULES,
    microbatch_problems,
    pipeline_problems,
    stage_ranks,
)
from scalelab.backends.problem import Problem
from scalelab.backends.registry import AUTO
from scalelab.errors import UsageError
from scalelab.models.gpt import GPT


class GPTStage(nn.Module):
    """Blocks ``first..last-1`` of a GPT, with the embeddings when it is the first stage
    and the final norm and head when it is the last. Shares the GPT's modules."""

    def __init__(self, model: GPT, first: int, last: int, recompute: bool = False) -> None:
        super().__init__()
        self.is_first, self.is_last = first == 0, last == model.n_layers
        self.recompute, self.width = recompute, model.d_model
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
            if self.recompute and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.is_last:
            return torch.matmul(self.head.weight, self.ln(x).transpose(1, 2))
        return x


def split_gpt(model: nn.Module, stage: int, n_stages: int, recompute: bool = False) -> GPTStage:
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
    return GPTStage(model, stage * per, (stage + 1) * per, recompute)


class LocalGPT(nn.Module):
    """The parts of a GPT that one pipeline rank holds, under the GPT's own parameter names
    (its state dict is a piece of the whole model's): what the optimizer, checkpoints
    and ``model.pt`` see. The rank's :class:`GPTStage` modules share its submodules."""

    def __init__(self, stages: list[GPTStage], whole: GPT) -> None:
        super().__init__()
        self.n_heads, self.seq_len = whole.n_heads, whole.seq_len
        # The whole model's figures, for the summary (this rank holds a piece of it).
        weights = [p for p in whole.parameters() if p.requires_grad]
        self.whole_counts = (
            sum(p.numel() for p in weights),
            sum(p.numel() * p.element_size() for p in weights),
        )
        self._flops_per_token = whole.flops_per_token()
        for stage in stages:
            for name in ("tok", "pos", "drop", "ln", "head"):
                if hasattr(stage, name):
                    setattr(self, name, getattr(stage, name))
        self.blocks = nn.ModuleDict({k: b for s in stages for k, b in s.blocks.items()})

    def flops_per_token(self) -> float:
        """The whole GPT's training FLOPs per token (what MFU divides by)."""
        return self._flops_per_token

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a pipeline rank's parts run through its Pipeline, not forward()")


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
    #: Stage index -> the pipeline rank holding it, and this rank's index.
    owner: list[int]
    pp_rank: int
    group: Any = None

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

    def step(
        self, x: torch.Tensor | None, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One forward and backward of the whole batch, split into the schedule's m
        micro-batches; gradients accumulate in the stages' parameters (averaged over the
        micro-batches). The rank holding the first stage reads the tokens ``x``, the one
        holding the last the targets ``y`` (other ranks may pass None); that rank gets the
        mean loss and the logits, others None. A batch that m does not split evenly is
        refused."""
        m = self.microbatches
        for batch in (x, y):  # every rank that passes the batch refuses it alike
            found = microbatch_problems(m, batch.shape[0]) if batch is not None else []
            if found:
                raise UsageError(found[0].line())
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        target = y if self.has_last else None
        logits = self.schedule.step(*args, target=target, losses=losses)
        if not self.has_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean(), logits

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Logits of the tokens ``x`` on the rank holding the last stage (None elsewhere):
        the stages in order, activations sent point to point. For evaluation, whose
        chunks need not split into the schedule's micro-batches."""
        mine = {s: m for s, m in zip(self._indices(), self.modules, strict=True)}
        act: torch.Tensor = x
        last = len(self.owner) - 1
        for s, holder in enumerate(self.owner):
            if holder != self.pp_rank:
                continue
            if s > 0 and self.owner[s - 1] != self.pp_rank:
                d = self.modules[0].width
                act = torch.empty(x.shape[0], x.shape[1], d, device=x.device)
                dist.recv(act, group=self.group, group_src=self.owner[s - 1])
            act = mine[s](act)
            if s < last and self.owner[s + 1] != self.pp_rank:
                dist.send(act.float().contiguous(), group=self.group, group_dst=self.owner[s + 1])
        return act if self.has_last else None

    def _indices(self) -> list[int]:
        return [s for s, r in enumerate(self.owner) if r == self.pp_rank]


def split_for_rank(
    model: nn.Module, pp_rank: int, pp: int, v: int, schedule: str, recompute: bool = False
) -> tuple[LocalGPT, list[GPTStage]]:
    """The stages ``pp_rank`` of ``pp`` holds (``v`` each, :func:`stage_ranks`), and the
    :class:`LocalGPT` that names their parameters. Every rank calls it with the same model
    (built from the same seed), so the pieces are the 1-process model's."""
    n_layers = model.n_layers if isinstance(model, GPT) else None
    found = pipeline_problems(
        pp, v, 1 if schedule != "1f1b" else pp, schedule, n_layers, AUTO, "gpt"
    )
    if not isinstance(model, GPT):
        found.insert(0, Problem("dist.pp", f"{type(model).__name__} does not split into stages"))
    if found:
        raise UsageError(found[0].line())
    n_stages = pp * v
    modules = [
        split_gpt(model, s, n_stages, recompute) for s in stage_ranks(pp, v, schedule)[pp_rank]
    ]
    return LocalGPT(modules, model), modules


def build_pipeline(
    modules: list[GPTStage],
    pp_rank: int,
    pp: int,
    v: int,
    m: int,
    schedule: str,
    device: torch.device,
    group: Any = None,
) -> Pipeline:
    """Torch's pipeline stages for this rank's ``modules`` (from :func:`split_for_rank`,
    already split over tp or sharded where the backend does that) and the schedule
    ``schedule`` over ``m`` micro-batches, on the process ``group`` of the pipeline (the
    world when None)."""
    from torch.distributed import pipelining

    found = pipeline_problems(pp, v, m, schedule, None, AUTO, "gpt")
    if found:
        raise UsageError(found[0].line())
    spec = SCHEDULES[schedule]
    n_stages = pp * v
    held = stage_ranks(pp, v, schedule)
    owner = [next(r for r, ss in enumerate(held) if s in ss) for s in range(n_stages)]
    stages = [
        pipelining.PipelineStage(mod.to(device), s, n_stages, device, group=group)
        for mod, s in zip(modules, held[pp_rank], strict=True)
    ]
    cls = getattr(pipelining, spec.torch_class)
    if spec.virtual_stages == 1:
        sched = cls(stages[0], n_microbatches=m, loss_fn=lm_loss)
    else:
        sched = cls(stages, n_microbatches=m, loss_fn=lm_loss)
    return Pipeline(modules, stages, sched, m, owner, pp_rank, group)
