"""The GPT's shapes without torch: sizes, heads and the tensor-parallel plan of a block.

The plan (:mod:`scalelab.study.plan`) and the layout rule
(:class:`scalelab.backends.parallel_dims.ParallelDims`) ask these while Snakemake parses
the workflow, where importing torch would cost seconds per parse.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SIZES", "TP_PLAN", "gpt_heads", "gpt_layers"]

#: size -> (d_model, n_layers, n_heads). gpt2 sizes from Radford et al. 2019; "1b" keeps
#: GPT-3 XL's width (2048) at 18 layers: 0.91B in blocks + embeddings ~ 1.0B at vocab 50257.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (32, 2, 4),
    "mini": (128, 4, 4),
    "small": (768, 12, 12),  # GPT-2 124M
    "medium": (1024, 24, 16),  # GPT-2 350M
    "large": (1280, 36, 20),  # GPT-2 774M
    "1b": (2048, 18, 16),
}

#: Tensor-parallel plan of one block: submodule name -> "colwise" | "rowwise".
TP_PLAN: dict[str, str] = {
    "attn.q": "colwise",
    "attn.k": "colwise",
    "attn.v": "colwise",
    "attn.o": "rowwise",
    "mlp.fc": "colwise",
    "mlp.proj": "rowwise",
}


def gpt_heads(options: dict[str, Any]) -> int | None:
    """Attention heads of the GPT that ``options`` (the model options of the config) build,
    or None when the options name no known size (the model build says why)."""
    size = options.get("size", "tiny")
    if options.get("n_heads") is not None:
        return int(options["n_heads"])
    return SIZES[size][2] if size in SIZES else None


def gpt_layers(options: dict[str, Any]) -> int | None:
    """Blocks of the GPT that ``options`` build (what pipeline stages split), or None when
    the options name no known size."""
    size = options.get("size", "tiny")
    if options.get("n_layers") is not None:
        return int(options["n_layers"])
    return SIZES[size][1] if size in SIZES else None
