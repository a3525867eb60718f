"""Sharded and tensor parallelism compute what one process computes.

One tiny GPT config (dropout 0, deterministic, 8 SGD steps) trains as one process,
as DDP at 2 ranks, as FSDP2 at 2 ranks, tensor-parallel at 2 ranks (ddp, tp=2) and
as dp=2 x tp=2 at 4 ranks (fsdp on the dp dimension, with gradient accumulation and
activation checkpointing). All are real torchrun jobs on gloo. Their final
weights (model.pt, gathered from the shards) agree within 1e-5, and the per-rank
parameter + gradient + optimizer-state bytes each rank measured from its local
shards show what sharding buys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import PY, TRAIN, max_diff, ok, run, weights, write_config

from scalelab.data.tokens import PROBS, TokenSequences
from scalelab.errors import UsageError
from scalelab.layout import Layout
from scalelab.models import build_model

ATOL = 1e-5

GPT_TINY = {
    "seed": 11,
    "model": {"name": "gpt", "options": {"size": "tiny"}},
    "data": {
        "source": "tokens",
        "num_samples": 256,
        "val_samples": 64,
        "seq_len": 16,
        "vocab_size": 32,
    },
    "optim": {"name": "sgd", "global_batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 1, "threads": 1, "progress": False, "deterministic": True},
    "metrics": {"warmup_steps": 1},
}


def torchrun(n: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]


CASES: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["dist.backend=none"]),
    "ddp2": (2, ["dist.backend=ddp"]),
    # 65 validation samples: shares of 32 and 33, still the same number of eval forwards
    "fsdp2": (2, ["dist.backend=fsdp", "data.val_samples=65"]),
    "tp2": (2, ["dist.backend=ddp", "dist.tp=2"]),
    "fsdp2xtp2": (
        4,
        [
            "dist.backend=fsdp",
            "dist.tp=2",
            "optim.grad_accum_steps=2",
            "dist.fsdp.activation_checkpointing=true",
        ],
    ),
    "fsdp2-bf16": (2, ["dist.backend=fsdp", "dist.fsdp.mixed_precision=bf16"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharding")
    config = write_config(root / "gpt.yaml", GPT_TINY)
    out = {}
    for name, (ranks, sets) in CASES.items():
        launcher = [PY] if ranks == 1 else torchrun(ranks)
        extra = [arg for s in sets for arg in ("--set", s)]
        ok(
            run(
                [*launcher, *TRAIN, "--config", str(config), "--out", str(root / name), *extra],
                timeout=300,
            )
        )
        out[name] = root / name
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_training_moved_the_weights(runs: dict[str, Path]) -> None:
    torch.manual_seed(GPT_TINY["seed"])
    d = GPT_TINY["data"]
    initial = build_model("gpt", d["vocab_size"], (d["seq_len"],), size="tiny").state_dict()
    assert max_diff(weights(runs["single"]), initial) > 1e-3


@pytest.mark.parametrize("name", ["fsdp2", "tp2", "fsdp2xtp2"])
def test_sharded_runs_equal_one_rank_and_ddp(runs: dict[str, Path], name: str) -> None:
    final = weights(runs[name])
    assert max_diff(final, weights(runs["single"])) < ATOL
    assert max_diff(final, weights(runs["ddp2"])) < ATOL
    s = summary(runs[name])
    assert s["global_steps"] == 8 and s["world_size"] == CASES[name][0]
    assert s["backend"] == ("fsdp" if "fsdp" in name else "ddp")
    tp = 2 if "tp" in name else 1
    assert (s["tp"], s["dp"]) == (tp, CASES[name][0] // tp)


def test_fsdp_mixed_precision_computes_in_bf16(runs: dict[str, Path]) -> None:
    """bf16 parameters in forward/backward (fp32 master weights and reduction): close to
    the fp32 run at bf16's resolution, but not equal to it (the policy is applied)."""
    diff = max_diff(weights(runs["fsdp2-bf16"]), weights(runs["single"]))
    assert 1e-6 < diff < 1e-2
    s = summary(runs["fsdp2-bf16"])
    assert s["rank0_param_bytes"] == summary(runs["fsdp2"])["rank0_param_bytes"]  # fp32 shards


def test_fsdp_halves_the_state_each_rank_holds(runs: dict[str, Path]) -> None:
    ddp, fsdp, tp = (summary(runs[n]) for n in ("ddp2", "fsdp2", "tp2"))
    # DDP holds everything: parameters = the model, gradients and momentum the same size
    assert ddp["rank0_param_bytes"] == ddp["num_params"] * 4
    assert ddp["rank0_grad_bytes"] == ddp["rank0_optim_state_bytes"] == ddp["rank0_param_bytes"]
    assert fsdp["rank0_state_bytes"] <= 0.55 * ddp["rank0_state_bytes"]
    assert fsdp["rank0_param_bytes"] <= 0.55 * ddp["rank0_param_bytes"]
    # tp=2 splits the block linears only (embeddings, norms and head stay whole)
    assert tp["rank0_state_bytes"] < ddp["rank0_state_bytes"]
    quad = summary(runs["fsdp2xtp2"])
    assert quad["rank0_state_bytes"] < fsdp["rank0_state_bytes"]


def test_language_model_summary(runs: dict[str, Path]) -> None:
    s = summary(runs["single"])
    assert s["val_perplexity"] == pytest.approx(math.exp(s["val_loss"]))
    assert s["train_perplexity"] == pytest.approx(math.exp(s["train_loss"]))
    assert 0 <= s["val_acc"] <= 1 and 0 <= s["train_acc"] <= 1  # per-token accuracy
    assert s["seq_len"] == 16 and s["tokens_per_s"] == pytest.approx(16 * s["samples_per_s"])
    model = build_model("gpt", 32, (16,), size="tiny")
    assert s["flops_per_token_train"] == model.flops_per_token() > 6 * 16 * 32  # >= 6 x head
    assert s["mfu"] is None and "CPU" in s["mfu_peak"]


# ----------------------------------------------------------------------------- in-process


def test_token_source_is_seeded_and_follows_its_chain() -> None:
    data = TokenSequences(500, 40, 24, seed=3)
    x, y = data.get_batch(np.arange(500))
    assert x.shape == y.shape == (500, 24) and x.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the next tokens
    again, _ = TokenSequences(500, 40, 24, seed=3).get_batch(np.array([7, 3]))
    assert (again == x[[7, 3]]).all()
    other, _ = TokenSequences(500, 40, 24, seed=4).get_batch(np.arange(500))
    assert (other != x).mean() > 0.5
    # every transition is one of the token's successors, with the chain's frequencies
    seq = data.sequences(np.arange(500))
    prev, nxt = seq[:, :-1].ravel(), seq[:, 1:].ravel()
    rank = (data._succ[prev] == nxt[:, None]).argmax(1)
    assert (data._succ[prev, rank] == nxt).all()
    freq = np.bincount(rank, minlength=len(PROBS)) / len(rank)
    assert np.abs(freq - PROBS).max() < 0.01
    assert data.entropy_nats < 0.5 * data.uniform_nats
    val = TokenSequences(10, 40, 24, seed=3, first_index=500)
    assert (val.get_batch(np.arange(10))[0] != x[:10]).any()


def test_token_source_is_learnable(tmp_path: Path) -> None:
    from scalelab.train.loop import run as train

    cfg = json.loads(json.dumps(GPT_TINY))
    cfg["optim"] = {"name": "adamw", "global_batch_size": 32, "lr": 0.01}
    cfg["train"].update(epochs=3)
    cfg["data"]["num_samples"] = 512
    s = train(cfg, tmp_path / "run", overrides=["dist.backend=none"])
    data = TokenSequences(1, 32, 16)
    # from log(32) = 3.47 towards the chain's floor of 1.16 nats
    assert data.entropy_nats < s["val_loss"] < 0.6 * data.uniform_nats


def _layout(world: int) -> Layout:
    return Layout(0, world, 0, world, "127.0.0.1", 29500, "torchrun")


@pytest.mark.parametrize(
    "backend, world, tp, model, message",
    [
        ("horovod", 4, 2, "gpt", "needs the ddp or fsdp backend, not horovod"),
        ("ddp", 2, 4, "gpt", "tp=4 needs a multiple of 4 ranks; the launcher started 2"),
        ("fsdp", 6, 4, "gpt", "tp=4 needs a multiple of 4 ranks"),
        ("ddp", 4, 2, "cnn", "model 'cnn' has no tensor-parallel plan"),
        ("auto", 1, 2, "gpt", "tp=2 needs a multiple of 2 ranks; the launcher started 1"),
    ],
)
def test_impossible_tensor_parallel_layouts_are_refused(
    backend: str, world: int, tp: int, model: str, message: str
) -> None:
    from scalelab.backends import choose_backend

    with pytest.raises(UsageError, match="field 'dist.tp'") as err:
        choose_backend(backend, _layout(world), tp, model)
    assert message in str(err.value)


def test_fsdp_and_tp_are_valid_config() -> None:
    from scalelab.backends import choose_backend
    from scalelab.train.config import from_dict

    cfg = from_dict({**GPT_TINY, "dist": {"backend": "fsdp", "tp": 2}})
    assert choose_backend(cfg.dist.backend, _layout(4), cfg.dist.tp, cfg.model.name) == "fsdp"
    with pytest.raises(UsageError, match="field 'dist.tp'"):
        from_dict({**GPT_TINY, "dist": {"tp": 0}})


# ----------------------------------------------------------------------------- resharding


def _resume_from(source: Path, step: int, target: Path) -> None:
    """A run directory (marker included) holding only ``source``'s distributed checkpoint
    at ``step``: the state of a run stopped right after that checkpoint."""
    import shutil

    from scalelab.output_guard import MARKER

    (target / "checkpoints").mkdir(parents=True)
    shutil.copy2(source / MARKER, target / MARKER)
    name = f"ckpt-{step:09d}.dcp"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


@pytest.mark.parametrize(
    "before, after",
    [
        ((2, ["dist.backend=fsdp"]), (1, ["dist.backend=fsdp"])),
        ((4, ["dist.backend=fsdp", "dist.tp=2"]), (2, ["dist.backend=fsdp"])),
        # a sharded run continued unsharded: DCP reads full tensors into a plain module
        ((2, ["dist.backend=fsdp"]), (1, ["dist.backend=ddp"])),
        ((4, ["dist.backend=fsdp", "dist.tp=2"]), (2, ["dist.backend=ddp"])),
    ],
    ids=["fsdp2-to-1", "fsdp2xtp2-to-fsdp2", "fsdp2-to-ddp1", "fsdp2xtp2-to-ddp2"],
)
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path: Path, before, after) -> None:
    """A distributed checkpoint (each rank wrote its shards) of a run stopped after epoch 1
    at one world size continues at another with --reshard, and ends where the
    uninterrupted run ends; without --reshard the resume is refused, writing nothing."""
    cfg = json.loads(json.dumps(GPT_TINY))
    cfg["train"]["epochs"] = 2
    config = write_config(tmp_path / "gpt.yaml", cfg)

    def train(ranks: int, sets: list[str], out: Path, *extra: str):
        launcher = [PY] if ranks == 1 else torchrun(ranks)
        args = [arg for s in sets for arg in ("--set", s)]
        return ok(
            run(
                [*launcher, *TRAIN, "--config", str(config), "--out", str(out), *args, *extra],
                timeout=300,
            )
        )

    train(before[0], before[1], tmp_path / "whole")
    dcp_dir = tmp_path / "whole" / "checkpoints" / "ckpt-000000008.dcp"
    shards = sorted(p.name for p in dcp_dir.glob("*.distcp"))
    assert len(shards) == before[0], shards  # every rank wrote its own shards
    assert {".metadata", "meta.pt", "SHA256SUMS"} <= {p.name for p in dcp_dir.iterdir()}
    _resume_from(tmp_path / "whole", 8, tmp_path / "resumed")
    launcher = [PY] if after[0] == 1 else torchrun(after[0])
    refused = run(
        [
            *launcher,
            *TRAIN,
            "--config",
            str(config),
            "--out",
            str(tmp_path / "resumed"),
            *[a for s in after[1] for a in ("--set", s)],
            "--resume",
        ],
        timeout=300,
    )
    # exit 2 from the trainer; torchrun reports any failed worker as its own exit 1
    assert refused.returncode == (2 if after[0] == 1 else 1), refused.stderr[-2000:]
    lines = [x for x in refused.stderr.splitlines() if x.startswith("scalelab train: error")]
    assert len(lines) == 1 and "--reshard" in lines[0] and f"by {before[0]} ranks" in lines[0]
    assert not (tmp_path / "resumed" / "summary.json").exists()
    proc = train(after[0], after[1], tmp_path / "resumed", "--resume", "--reshard")
    assert "resumed from ckpt-000000008.dcp at epoch 2" in proc.stdout
    s = summary(tmp_path / "resumed")
    assert (s["resumes"], s["global_steps"], s["world_size"]) == (1, 16, after[0])
    assert s["backend"] == after[1][0].removeprefix("dist.backend=")
    # reduction order differs between the layouts: equal to float32 round-off, not bitwise
    assert max_diff(weights(tmp_path / "resumed"), weights(tmp_path / "whole")) < ATOL
