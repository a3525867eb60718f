"""The FLOPs owner (scalelab.models.flops): the values it gives for the shipped models are
the ones the trainer's summary had before FLOPs moved there, and every MFU goes through it.

The counted forward FLOPs (2 per multiply-add) are written as the architectures' formulas;
the ResNets, too long to write out, carry the values the previous function
(``scalelab.train.metrics.forward_flops`` at commit 6196456) returned.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scalelab.data.spec import DataSpec
from scalelab.models import build_model
from scalelab.models.flops import forward_flops, mfu, train_flops
from scalelab.models.gpt import lm_facts
from scalelab.models.gpt_shapes import SIZES
from scalelab.train.peak import peak_bf16
from scalelab.train.records import model_facts

SRC = Path(__file__).resolve().parents[1] / "src" / "scalelab"


def cnn_flops(c: int, h: int, w: int, classes: int, width: int = 32, hidden: int = 128) -> int:
    """Two 3x3 'same' convs (the second after a 2x2 pool), flatten after a second pool,
    two linear layers."""
    flat = 2 * width * (h // 4) * (w // 4)
    return 2 * (
        h * w * width * c * 9
        + (h // 2) * (w // 2) * 2 * width * width * 9
        + flat * hidden
        + hidden * classes
    )


def gpt_flops(vocab: int, seq: int, size: str) -> int:
    """Per layer q, k, v, o (4 d^2) and the MLP (8 d^2) per token, attention scores and
    their weighted sum (2 T d each, full, not causal, as the counter counts them); the
    LM head. The embeddings are lookups (no FLOPs)."""
    d, layers, _ = SIZES[size]
    return layers * (2 * seq * 12 * d * d + 2 * 2 * seq * seq * d) + 2 * seq * d * vocab


def vit_flops(
    c: int,
    h: int,
    w: int,
    classes: int,
    patch: int = 4,
    dim: int = 192,
    depth: int = 6,
    mlp: int = 768,
) -> int:
    """Patch embedding; per layer the packed q/k/v and out projections, the MLP and the
    attention (scores and weighted sum over patches + the class token); the head on the
    class token."""
    patches = (h // patch) * (w // patch)
    n = patches + 1
    layer = 2 * n * dim * 3 * dim + 2 * n * dim * dim + 2 * 2 * n * dim * mlp + 4 * n * n * dim
    return 2 * patches * c * patch * patch * dim + depth * layer + 2 * dim * classes


@pytest.mark.parametrize(
    "name, options, spec, expected",
    [
        ("cnn", {}, DataSpec(10, (3, 32, 32)), cnn_flops(3, 32, 32, 10)),
        (
            "cnn",
            {"width": 8, "hidden": 32},
            DataSpec(4, (3, 16, 16)),
            cnn_flops(3, 16, 16, 4, width=8, hidden=32),
        ),
        ("gpt", {"size": "tiny"}, DataSpec(32, (16,)), gpt_flops(32, 16, "tiny")),
        ("gpt", {"size": "mini"}, DataSpec(256, (64,)), gpt_flops(256, 64, "mini")),
        ("vit", {}, DataSpec(10, (3, 32, 32)), vit_flops(3, 32, 32, 10)),
        # the previous function's values (too long to write out)
        ("resnet18", {}, DataSpec(10, (3, 32, 32)), 1_110_845_440),
        ("resnet50", {}, DataSpec(1000, (3, 224, 224)), 8_178_368_512),
    ],
)
def test_forward_flops_of_the_shipped_models_are_unchanged(name, options, spec, expected):
    assert forward_flops(name, options, spec) == float(expected)
    assert train_flops(forward_flops(name, options, spec)) == 3.0 * expected


def test_the_gpt_closed_form_is_nanogpts_6n_plus_attention():
    model = build_model("gpt", 32, (16,), size="tiny")
    d, layers, _ = SIZES["tiny"]
    n = sum(p.numel() for p in model.parameters()) - 32 * d - 16 * d  # no embeddings
    assert model.flops_per_token() == 6 * n + 12 * layers * 16 * d == 171_264


def test_mfu_is_one_definition_for_samples_and_tokens(monkeypatch):
    """model_facts (counted FLOPs per sample) and lm_facts (closed form per token) both give
    the figure the previous formulas gave, bit for bit, on a card in the peak table."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    gpu = SimpleNamespace(type="cuda")
    spec = DataSpec(10, (3, 32, 32))
    model = build_model("cnn", 10, (3, 32, 32))
    facts = model_facts("cnn", {}, spec, model, gpu, 500.0, True)
    fwd = float(cnn_flops(3, 32, 32, 10))
    assert facts["mfu"] == 3 * fwd * 500.0 / 989e12  # the previous expression
    assert facts["mfu"] == mfu(facts["flops_per_sample_train"], 500.0, 989e12)
    assert facts["mfu_peak"].startswith("NVIDIA H100 80GB HBM3: 989 TFLOP/s")

    gpt = build_model("gpt", 32, (16,), size="tiny")
    lm = lm_facts(gpt, {"samples_per_s_per_rank": 40.0, "samples_per_s": 80.0}, gpu, peak_bf16)
    tokens = 40.0 * 16
    assert lm["mfu_lm"] == gpt.flops_per_token() * tokens / 989e12  # the previous expression
    assert lm["mfu_lm"] == mfu(gpt.flops_per_token(), tokens, 989e12)


def test_no_module_but_the_owner_counts_flops():
    """FlopCounterMode is used in scalelab.models.flops only, and MFU is computed only by
    its mfu() (no other module divides by a peak)."""
    counters, peak_divisions = [], []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(SRC))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name == "FlopCounterMode":
                    counters.append(rel)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                right = ast.unparse(node.right)
                if ("peak" in right or "card" in right) and rel != "models/flops.py":
                    peak_divisions.append(f"{rel}:{node.lineno}")
    assert set(counters) == {"models/flops.py"}
    assert peak_divisions == [], peak_divisions
