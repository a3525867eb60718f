"""FLOPs of a model and the one MFU definition: every FLOPs or MFU figure asks here.

A model's training FLOPs per sample are 3 x its forward FLOPs (backward costs two
forwards: the convention of nanoGPT's ``estimate_mfu`` and the PaLM paper's MFU). The
forward is counted by torch's FlopCounterMode on a copy of the model on the meta device
(no memory, no compute), built by :func:`scalelab.models.build` for the data it trains
on, so a sharded or wrapped training model is never touched.

A model class may also know its FLOPs in closed form: :class:`~scalelab.models.gpt.GPT`
has ``flops_per_token()`` (6 N + 12 L T d, nanoGPT's formula, written once here as
:func:`lm_train_flops_per_token`), which the language-model figures use
(:func:`scalelab.models.gpt.lm_facts`) and the layout model of ``predict --advise``
(:mod:`scalelab.comm.layout_model`) evaluates for a GPT it never builds. Both end in
:func:`mfu`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalelab.models import build

if TYPE_CHECKING:
    from scalelab.data.spec import DataSpec

#: Training FLOPs per forward FLOP: the forward, and a backward of two forwards.
TRAIN_PER_FORWARD = 3


def forward_flops(name: str, options: dict[str, Any], spec: DataSpec) -> float | None:
    """Forward FLOPs of one sample (2 per multiply-add) of model ``name`` with ``options``
    built for ``spec``; None where counting fails (an op the counter does not know)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build(name, options, spec)
            x = torch.empty(1, *spec.input_shape)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops()) or None
    except Exception:  # noqa: BLE001 - an unknown op only means "not known"
        return None


def train_flops(forward: float | None) -> float | None:
    """Training FLOPs per sample from the forward's (None stays None)."""
    return TRAIN_PER_FORWARD * forward if forward else None


def lm_train_flops_per_token(
    matmul_params: float, n_layers: int, seq_len: int, d_model: int
) -> float:
    """Training FLOPs per token of a decoder: 6 N + 12 L T d (PaLM appendix B, nanoGPT's
    ``estimate_mfu``). N counts the weights that multiply (blocks and LM head, not the
    embedding lookups); 12 L T d is the attention's scores and weighted sum, forward and
    backward. For a Megatron GPT (N = 12 L h^2 + V h) it is Narayanan et al. 2021's
    72 B s L h^2 (1 + s/(6h) + V/(12 L h)) per B s tokens, without recomputation."""
    return 6.0 * matmul_params + 12.0 * n_layers * seq_len * d_model


def mfu(flops_per_unit: float, units_per_s_per_gpu: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s per GPU over the card's peak.

    A unit is what the rate counts (a sample, or a token with FLOPs per token)."""
    return flops_per_unit * units_per_s_per_gpu / peak_flops_per_s
