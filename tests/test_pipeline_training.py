"""Pipeline parallelism trains what one process trains.

One GPT config (4 blocks, dropout 0, deterministic, 8 SGD steps with momentum) trains as
one process and through pipelines: pp=2 under each of gpipe, 1f1b, interleaved-1f1b
(v=2) and torch's two zero-bubble schedules, pp=2 x tp=2, dp=2 x pp=2 (ddp and fsdp),
and pp=2 with activation recomputation.
All are real torchrun jobs on gloo; the final weights (model.pt, gathered from the
stages) agree with the one-process run within 1e-5. The per-rank bytes each rank
measured show what the pipeline and the recomputation buy. A pp=2 checkpoint continues
at pp=1 and at dp=2 under --reshard. The 8-rank dp x tp x pp point runs across the test
cluster's nodes in tests/test_cluster_pipeline.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import scalelab_main
from test_sharding import GPT_TINY, _resume_from, summary, torchrun
from train_support import PY, TRAIN, max_diff, ok, run, weights, write_config

ATOL = 1e-5

#: test_sharding's tiny GPT with 4 blocks: enough for 2 stages of 2, or 4 of 1 (v=2).
GPT4 = copy.deepcopy(GPT_TINY)
GPT4["model"]["options"]["n_layers"] = 4

PP2 = ["dist.pp=2", "dist.microbatches=4"]
CASES: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["dist.backend=none"]),
    "pp2-gpipe": (2, [*PP2, "dist.schedule=gpipe"]),
    "pp2-1f1b": (2, [*PP2, "dist.schedule=1f1b"]),
    "pp2-interleaved": (2, [*PP2, "dist.schedule=interleaved-1f1b", "dist.virtual_stages=2"]),
    "pp2-interleaved-zb": (
        2,
        [*PP2, "dist.schedule=interleaved-zero-bubble", "dist.virtual_stages=2"],
    ),
    "pp2-zbv": (2, [*PP2, "dist.schedule=zbv-zero-bubble", "dist.virtual_stages=2"]),
    "pp2-recompute": (2, [*PP2, "dist.activation_checkpointing=true"]),
    "pp2xtp2": (4, [*PP2, "dist.tp=2"]),
    "dp2xpp2": (4, ["dist.pp=2", "dist.microbatches=2"]),
    "fsdp-dp2xpp2": (4, ["dist.backend=fsdp", "dist.pp=2", "dist.microbatches=2"]),
}
PIPELINES = [name for name in CASES if name != "single"]


def train(config: Path, ranks: int, sets: list[str], out: Path, *extra: str):
    launcher = [PY] if ranks == 1 else torchrun(ranks)
    args = [arg for s in sets for arg in ("--set", s)]
    cmd = [*launcher, *TRAIN, "--config", str(config), "--out", str(out), *args, *extra]
    return ok(run(cmd, timeout=300))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    config = write_config(root / "gpt.yaml", GPT4)
    for name, (ranks, sets) in CASES.items():
        train(config, ranks, sets, root / name)
    return {name: root / name for name in CASES}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_equals_one_process(runs: dict[str, Path], name: str) -> None:
    final, single = weights(runs[name]), weights(runs["single"])
    assert list(final) == list(single)  # model.pt in the GPT's own order
    assert max_diff(final, single) < ATOL
    s, ranks = summary(runs[name]), CASES[name][0]
    tp = 2 if "tp2" in name else 1
    assert (s["global_steps"], s["world_size"]) == (8, ranks)
    assert (s["pp"], s["tp"], s["dp"]) == (2, tp, ranks // (2 * tp))
    v = 2 if ("interleaved" in name or "zb" in name) else 1
    assert s["bubble"] == pytest.approx((2 - 1) / (v * s["microbatches"]))
    assert s["bubble_is_upper_bound"] == ("zb" in name)
    assert s["num_params"] == summary(runs["single"])["num_params"]  # the whole model's
    assert s["val_loss"] == pytest.approx(summary(runs["single"])["val_loss"], abs=1e-5)
    assert len(s["per_stage"]) == 2


def test_pipeline_stages_hold_less_than_one_process(runs: dict[str, Path]) -> None:
    """Measured per-rank bytes: each stage holds about half the state and keeps fewer
    activations than the whole model does."""
    one = summary(runs["single"])
    for name in ("pp2-1f1b", "pp2-gpipe"):
        s = summary(runs[name])
        assert s["max_rank_state_bytes"] < 0.6 * one["rank0_state_bytes"], name
        assert s["max_rank_activation_peak_bytes"] < one["rank0_activation_peak_bytes"], name
    # tensor parallelism inside the stages splits them further
    assert (
        summary(runs["pp2xtp2"])["max_rank_state_bytes"]
        < summary(runs["pp2-1f1b"])["max_rank_state_bytes"]
    )


def test_recomputation_keeps_fewer_activations_and_the_same_weights(
    runs: dict[str, Path],
) -> None:
    plain, recomputed = summary(runs["pp2-1f1b"]), summary(runs["pp2-recompute"])
    assert recomputed["activation_checkpointing"] is True
    saved = [
        a["activation_peak_bytes"] / b["activation_peak_bytes"]
        for a, b in zip(recomputed["per_stage"], plain["per_stage"], strict=True)
    ]
    assert all(r < 0.7 for r in saved), saved
    assert max_diff(weights(runs["pp2-recompute"]), weights(runs["pp2-1f1b"])) < ATOL
    print("activation peak with recomputation / without, per stage:", saved)


@pytest.mark.parametrize(
    "after",
    [(1, ["dist.backend=ddp"]), (2, ["dist.backend=ddp"])],
    ids=["pp2-to-1", "pp2-to-dp2"],
)
def test_pipeline_checkpoint_resumes_at_another_layout(tmp_path: Path, after) -> None:
    """A pp=2 run's distributed checkpoint (each stage wrote its parameters) continues at
    pp=1 and at dp=2 with --reshard and ends where the uninterrupted run ends; without
    --reshard the resume is refused in one line."""
    cfg = json.loads(json.dumps(GPT4))
    cfg["train"]["epochs"] = 2
    config = write_config(tmp_path / "gpt.yaml", cfg)
    train(config, 2, PP2, tmp_path / "whole")
    _resume_from(tmp_path / "whole", 8, tmp_path / "resumed")
    args = [a for s in after[1] for a in ("--set", s)]
    launcher = [PY] if after[0] == 1 else torchrun(after[0])
    cmd = [*launcher, *TRAIN, "--config", str(config), "--out", str(tmp_path / "resumed")]
    refused = run([*cmd, *args, "--resume"], timeout=300)
    lines = [x for x in refused.stderr.splitlines() if x.startswith("scalelab train: error")]
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr[-2000:]
    assert "pp 2" in lines[0] and "--reshard" in lines[0]
    proc = train(config, after[0], after[1], tmp_path / "resumed", "--resume", "--reshard")
    assert "resumed from ckpt-000000008.dcp at epoch 2" in proc.stdout
    s = summary(tmp_path / "resumed")
    assert (s["resumes"], s["global_steps"], s["world_size"], s["pp"]) == (1, 16, after[0], 1)
    assert max_diff(weights(tmp_path / "resumed"), weights(tmp_path / "whole")) < ATOL


@pytest.mark.parametrize(
    "sets, line",
    [
        (
            ["model.options.n_layers=2", "dist.schedule=interleaved-1f1b", "dist.virtual_stages=2"],
            "field 'dist.virtual_stages': the model's 2 layers do not split over pp x v "
            "= 2 x 2 = 4 stages",
        ),
        (
            ["dist.microbatches=1"],
            "field 'dist.microbatches': schedule 1f1b needs m >= pp = 2 micro-batches, not 1",
        ),
        (
            ["dist.backend=horovod"],
            "field 'dist.pp': pipeline parallelism (pp=2) needs a torch.distributed backend, "
            "not horovod",
        ),
        (
            ["model.name=cnn", "data.source=synthetic", "model.options={}"],
            "field 'dist.pp': model 'cnn' does not split into pipeline stages "
            "(pp > 1 supports: gpt)",
        ),
        (
            [],
            "field 'dist.pp': tp x pp = 1 x 2 needs a multiple of 2 ranks; the launcher started 1",
        ),
    ],
    ids=["layers", "m-lt-pp", "horovod", "cnn", "ranks"],
)
def test_impossible_pipeline_is_one_line_naming_the_field(tmp_path: Path, sets, line) -> None:
    config = write_config(tmp_path / "gpt.yaml", GPT4)
    args = [a for s in ["dist.pp=2", *sets] for a in ("--set", s)]
    rc, out, err = scalelab_main("train", "--config", config, "--out", tmp_path / "r", *args)
    assert rc == 2, err
    assert err.strip().splitlines() == [f"scalelab train: error: {line}"]
    assert not (tmp_path / "r").exists()


def test_predict_refuses_a_pipeline_base_run_in_one_line(runs: dict[str, Path], tmp_path) -> None:
    """Extrapolating a pipeline run with the data-parallel scaling model would print
    figures without the bubble; predict names the field and the advisor instead."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text("")
    out = tmp_path / "predict"
    code, _, err = scalelab_main(
        "predict", "--run", runs["dp2xpp2"], "--commbench", bench, "--out", out
    )
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert "dist.pp = 2" in lines[0] and "--advise" in lines[0], lines[0]
    assert not out.exists()
