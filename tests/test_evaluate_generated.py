"""`scalelab evaluate` on a generated source: the GPT on seeded tokens gets a test split
(ids after training and validation), loss, per-token accuracy and perplexity."""

from __future__ import annotations

import json
import math

import pytest
from conftest import scalelab_main
from train_support import TINY, deep_update, write_config

from scalelab.data.tokens import TokenSequences

GPT = {
    "seed": 5,
    "model": {"name": "gpt"},
    "data": {
        "source": "tokens",
        "num_samples": 256,
        "val_samples": 64,
        "seq_len": 16,
        "vocab_size": 32,
    },
    "optim": {"global_batch_size": 32, "lr": 0.003, "name": "adamw"},
    "train": {"epochs": 2, "threads": 1, "progress": False},
}


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    rc, _, err = scalelab_main(
        "train", "--config", write_config(root / "gpt.yaml", GPT), "--out", root / "run"
    )
    assert rc == 0, err
    return root / "run"


def test_a_tokens_run_is_scored_on_unseen_sequences(gpt_run, tmp_path):
    out = tmp_path / "evaluation.json"
    rc, stdout, err = scalelab_main("evaluate", "--run", gpt_run, "--out", out)
    assert rc == 0, err
    ev = json.loads(out.read_text())
    assert ev["source"] == "tokens" and ev["samples"] == 64 and ev["tokens"] == 64 * 16
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert f"perplexity {ev['perplexity']:.3f}" in stdout
    chain = TokenSequences(1, 32, 16)
    # learned something (below uniform), and cannot beat the chain's entropy by much
    assert chain.entropy_nats * 0.9 < ev["loss"] < chain.uniform_nats, ev
    summary = json.loads((gpt_run / "summary.json").read_text())
    # the test split is unseen but from the same chain: close to validation, not equal
    assert ev["loss"] == pytest.approx(summary["val_loss"], rel=0.1)
    assert ev["loss"] != summary["val_loss"]
    assert "per_class_accuracy" not in ev


def test_data_does_not_apply_to_a_generated_source(gpt_run, tmp_path):
    rc, _, err = scalelab_main(
        "evaluate", "--run", gpt_run, "--data", tmp_path, "--out", tmp_path / "e.json"
    )
    assert rc == 2 and "--data" in err and "tokens" in err, err
    rc, _, err = scalelab_main("evaluate", "--run", gpt_run, "--split", "val")
    assert rc == 2 and "--split val" in err, err
    assert not (tmp_path / "e.json").exists()


def test_a_synthetic_image_run_is_scored_per_class(tmp_path):
    cfg = deep_update(TINY, {"train": {"epochs": 2}})
    rc, _, err = scalelab_main(
        "train", "--config", write_config(tmp_path / "c.yaml", cfg), "--out", tmp_path / "run"
    )
    assert rc == 0, err
    rc, _, err = scalelab_main("evaluate", "--run", tmp_path / "run", "--out", tmp_path / "e.json")
    assert rc == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["samples"] == TINY["data"]["val_samples"] and "perplexity" not in ev
    assert len(ev["per_class_accuracy"]) == TINY["data"]["num_classes"]
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_a_staged_run_without_data_is_refused(tmp_path):
    """A run on files needs --data: one line naming it, exit 2, nothing written."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = {**TINY, "data": {"source": "staged", "path": str(tmp_path / "data")}}
    (run / "config.yaml").write_text(json.dumps(cfg))
    (run / "summary.json").write_text("{}")
    (run / "model.pt").write_bytes(b"")
    rc, _, err = scalelab_main("evaluate", "--run", run, "--out", tmp_path / "e.json")
    assert rc == 2 and "--data: required" in err, err
    assert not (tmp_path / "e.json").exists()
