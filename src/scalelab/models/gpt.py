"""A GPT-style decoder (pre-norm, causal self-attention, GELU MLP), nanoGPT-shaped.

Sizes run from ``tiny`` (CPU tests, ~0.1M parameters) to ``1b`` (~1.0B, GPUs).
The trainer speaks classification (``num_classes``, samples of ``image_shape``),
so for a language model ``num_classes`` is the vocabulary and ``image_shape`` is
``(seq_len,)``; :meth:`GPT.forward` returns logits as (batch, vocab, seq_len), the
class-second layout ``F.cross_entropy`` and ``argmax(1)`` take, so the loop's loss
is the mean next-token cross-entropy and its "accuracy" is next-token accuracy.

Attention projections are separate q/k/v/o linears and the MLP is fc/proj, so
tensor parallelism (:data:`TP_PLAN`) splits q, k, v and fc column-wise and o and
proj row-wise (Megatron-LM's split: one all-reduce per attention and per MLP).
Heads are viewed from the local width, so a tensor-parallel rank runs its own
``n_heads / tp`` heads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.models.flops import lm_train_flops_per_token, mfu
from scalelab.models.gpt_shapes import SIZES


class Attention(nn.Module):
    """Causal multi-head self-attention (scaled_dot_product_attention: flash on GPUs)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism this rank holds n_heads / tp of them
        q, k, v = (
            proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, final norm, untied LM head."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 L)
            for proj in (block.attn.o, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, vocab, T)."""
        if idx.is_floating_point():  # generic tooling (FLOP counting) passes float samples
            idx = idx.long()
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        # (vocab, d) @ (B, d, T): logits born in the (B, vocab, T) layout, no transposed view
        return torch.matmul(self.head.weight, self.ln(x).transpose(1, 2))

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.pos.weight.numel() - self.tok.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 N + 12 L T d (PaLM appendix B, nanoGPT's
        estimate_mfu); N counts the weights that multiply (blocks and LM head), not the
        embedding lookups."""
        n = self.num_params(embeddings=False)
        return lm_train_flops_per_token(n, self.n_layers, self.seq_len, self.d_model)


def gpt(
    num_classes: int,
    image_shape: tuple[int, ...],
    size: str = "tiny",
    d_model: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
    dropout: float = 0.0,
) -> GPT:
    """GPT decoder over a vocabulary of ``num_classes`` tokens and sequences of
    ``image_shape[-1]`` tokens; ``size`` picks (d_model, n_layers, n_heads) from
    :data:`SIZES`, each of which may be overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    d, layers, heads = SIZES[size]
    return GPT(
        num_classes,
        int(image_shape[-1]),
        d_model or d,
        n_layers or layers,
        n_heads or heads,
        dropout,
    )


def lm_facts(
    model: nn.Module,
    summary: dict[str, Any],
    device: Any,
    peak: Callable[[str], tuple[float, str] | None],
) -> dict[str, Any]:
    """Language-model figures for the summary: perplexity, tokens/s, FLOPs/token, MFU.

    ``model`` may be sharded: the counts come from the GPT attributes, not from the
    (local) parameters. MFU (:func:`scalelab.models.flops.mfu`) = 6N+12LTd FLOPs/token x
    tokens/s per rank / the card's dense bf16 peak (``peak``: card name -> (FLOP/s, source)
    or None).
    """
    # A GPT, a wrapped one (DDP's .module), or a pipeline rank's piece, which answers
    # for the whole model (scalelab.backends.pipeline.LocalGPT).
    gpt_model = model if hasattr(model, "flops_per_token") else getattr(model, "module", None)
    if not hasattr(gpt_model, "flops_per_token"):
        return {}
    per_token = gpt_model.flops_per_token()
    tokens = (summary.get("samples_per_s_per_rank") or 0) * gpt_model.seq_len
    facts: dict[str, Any] = {
        "seq_len": gpt_model.seq_len,
        "flops_per_token_train": per_token,
        "tokens_per_s": (summary.get("samples_per_s") or 0) * gpt_model.seq_len or None,
        "train_perplexity": _ppl(summary.get("train_loss")),
        "val_perplexity": _ppl(summary.get("val_loss")),
    }
    card = peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if card and tokens:
        facts["mfu_lm"] = mfu(per_token, tokens, card[0])
    return facts


def _ppl(loss: float | None) -> float | None:
    return math.exp(min(loss, 700.0)) if loss is not None else None
