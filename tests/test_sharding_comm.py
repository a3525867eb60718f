"""The collective counts scalelab.comm.collectives predicts are the ones torch issues.

A tiny 3-block GPT on 2 gloo ranks, one forward + backward under CommDebugMode:
tensor parallel (6 allreduces per block), FSDP2 resharding after forward (2G-1
all-gathers, G reduce-scatters for G shard groups) and keeping parameters (G, G).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import PY, ok, run

from scalelab.comm import collectives as C
from scalelab.models.gpt import gpt

SCRIPT = Path(__file__).parent / "scripts" / "sharding_comm_counts.py"

#: CommDebugMode's op names -> ours
OPS = {
    "all_reduce": "allreduce",
    "_allgather_base_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
}


def measured(mode: str) -> dict[str, int]:
    proc = ok(
        run(
            [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(SCRIPT)],
            timeout=180,
            extra_env={"MODE": mode},
        )
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return {OPS.get(k, k): v for k, v in json.loads(line).items()}


@pytest.mark.parametrize("mode", ["tp", "fsdp", "fsdp-keep"])
def test_predicted_counts_are_the_issued_ones(mode: str) -> None:
    model = gpt(32, (16,), size="tiny", n_layers=3)
    if mode == "tp":
        predicted = C.tp_step(model.n_layers, 4 * 16, model.d_model, tp=2)
    else:
        predicted = C.fsdp_step(C.fsdp_groups(model), 2, reshard_after_forward=mode == "fsdp")
    assert C.counts(predicted) == measured(mode)


def test_fsdp_moves_half_again_the_bytes_of_ddp() -> None:
    model = gpt(32, (16,), size="tiny", n_layers=3)
    groups = C.fsdp_groups(model)
    total = sum(groups)
    assert total == sum(p.numel() * 4 for p in model.parameters())
    ddp = C.step_seconds(C.ddp_step(total, 8), 0.0, 1e9)
    fsdp = C.step_seconds(C.fsdp_step(groups, 8), 0.0, 1e9)
    # ZeRO-3: all-gather twice (but the root once) + reduce-scatter once, vs 2x in allreduce
    assert fsdp / ddp == pytest.approx(1.5 - groups[-1] / (2 * total))
    keep = C.step_seconds(C.fsdp_step(groups, 8, reshard_after_forward=False), 0.0, 1e9)
    assert keep == pytest.approx(ddp)  # ZeRO-2-like: the same bytes as DDP
    assert C.step_seconds(C.fsdp_step(groups, 1), 1e-5, 1e9) == 0.0  # one rank: nothing
