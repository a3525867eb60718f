"""Checkpoint files, RNG capture, metrics records and the epoch line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelab.fsio import atomic_write_json
from scalelab.train import checkpoint as ckpt
from scalelab.train.records import EPOCH_LINE_RE, MetricsWriter, format_epoch_line
from scalelab.train.timing import throughput


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "scheduler": {},
        "epoch": 1,
        "step_in_epoch": step,
        "global_step": step,
        "rng": [ckpt.rng_state()],
        "config": {"seed": 1},
    }


def test_save_load_prune_and_skip_corrupt(tmp_path: Path, capsys) -> None:
    for step in (5, 10, 15):
        ckpt.save(ckpt.path_for(tmp_path, step), _state(step))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000000015.pt",
        "ckpt-000000010.pt",
        "ckpt-000000005.pt",
    ]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    ckpt.prune(tmp_path, keep=2)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2

    newest = ckpt.path_for(tmp_path, 15)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated by a crash mid-copy
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "ckpt-000000010.pt" and state["step_in_epoch"] == 10
    assert "skipping unreadable checkpoint" in capsys.readouterr().err

    ckpt.path_for(tmp_path, 10).write_bytes(b"garbage")
    assert ckpt.find_latest(tmp_path) is None


def test_load_rejects_incomplete_dict(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"format": 1, "model": {}}, path)
    with pytest.raises(ValueError, match="no checksum file"):
        ckpt.load(path)
    ckpt.write_checksum(path)
    with pytest.raises(ValueError, match="missing keys"):
        ckpt.load(path)


def test_one_flipped_bit_in_tensor_data_is_caught(tmp_path: Path, capsys) -> None:
    """torch.load accepts a flipped bit in a tensor (the zip holds no CRC check it
    verifies for storages); the recorded sha256 does not."""
    for step in (5, 10):
        ckpt.save(ckpt.path_for(tmp_path, step), _state(step))
    newest = ckpt.path_for(tmp_path, 10)
    raw = bytearray(newest.read_bytes())
    torch.load(newest, weights_only=True)  # loads before the flip ...
    at = raw.find(bytes(_state(10)["model"]["w"].numpy().tobytes()[:8]))
    assert at > 0, "tensor bytes not found in the checkpoint"
    raw[at + 3] ^= 0x40  # one bit of a float32's exponent
    newest.write_bytes(bytes(raw))
    flipped = torch.load(newest, weights_only=True)  # ... and after it, silently
    assert not torch.equal(flipped["model"]["w"], _state(10)["model"]["w"])
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ckpt.load(newest)
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "ckpt-000000005.pt" and state["step_in_epoch"] == 5
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "falling back to an older one" in err


def test_rng_state_roundtrip(tmp_path: Path) -> None:
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.save(tmp_path / "ckpt-000000001.pt", {**_state(1), "rng": [state]})
    ckpt.set_rng_state(ckpt.load(tmp_path / "ckpt-000000001.pt")["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])


def test_epoch_line_roundtrip() -> None:
    rec = {
        "epoch": 2,
        "epochs": 10,
        "train_loss": 1.23456,
        "train_acc": 0.5,
        "val_loss": None,
        "val_acc": None,
        "samples_per_s": 1234.56,
        "time_s": 9.5,
    }
    line = format_epoch_line(rec)
    m = EPOCH_LINE_RE.match(line)
    assert m, line
    assert (m["epoch"], m["epochs"], m["train_loss"], m["val_acc"], m["samples_per_s"]) == (
        "3",
        "10",
        "1.2346",
        "nan",
        "1234.6",
    )


def test_metrics_writer_and_throughput(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m.jsonl", enabled=True)
    writer.write({"kind": "step", "loss": 1.0})
    writer.write({"kind": "step", "loss": float("nan")})
    writer.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["step", "step"]
    MetricsWriter(tmp_path / "off.jsonl", enabled=False).write({"kind": "x"})
    assert not (tmp_path / "off.jsonl").exists()
    epochs = [
        {"timed_samples": 100, "timed_s": 10.0},
        {"timed_samples": 300, "timed_s": 1.0},
        {"timed_samples": 300, "timed_s": 2.0},
    ]
    assert throughput(epochs) == pytest.approx(200.0)  # first (warm-up) epoch excluded
    assert throughput(epochs[:1]) == pytest.approx(10.0)
    atomic_write_json(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}


def _sharded(tmp_path: Path, step: int) -> tuple[Path, torch.nn.Module]:
    """A real distributed checkpoint (torch.distributed.checkpoint, one process) of a small
    model and its SGD momentum, written through save_sharded."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    meta = {k: v for k, v in _state(step).items() if k not in ("model", "optimizer")}
    path = ckpt.path_for(tmp_path, step, sharded=True)
    barriers = []
    ckpt.save_sharded(path, model, opt, meta, rank=0, barrier=lambda: barriers.append(1))
    assert len(barriers) == 2  # before the shards are written, after the rename
    return path, model


def test_sharded_checkpoint_atomic_checksummed_and_loads(tmp_path: Path, capsys) -> None:
    ckpt.save(ckpt.path_for(tmp_path, 5), _state(5))
    path, model = _sharded(tmp_path, 10)
    assert path.name == "ckpt-000000010.dcp" and path.is_dir()
    names = {p.name for p in path.iterdir()}
    assert {".metadata", "meta.pt", "SHA256SUMS"} <= names and any(
        n.endswith(".distcp") for n in names
    )
    assert not list(tmp_path.glob(".*"))  # the hidden .partial directory was renamed away
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000000010.dcp",
        "ckpt-000000005.pt",
    ]

    state = ckpt.load(path)  # verifies every file, returns the non-tensor state
    assert state["global_step"] == 10 and state["model"] == path
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    ckpt.load_sharded(path, fresh, fresh_opt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all("momentum_buffer" in s for s in fresh_opt.state.values())

    # a flipped byte in a shard: refused by name; the resume falls back to the older one
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"sha256 mismatch in {shard.name}"):
        ckpt.load(path)
    found, _ = ckpt.find_latest(tmp_path)
    assert found.name == "ckpt-000000005.pt"
    assert "skipping unreadable checkpoint" in capsys.readouterr().err

    # no checksum file (the writer died before finishing) or a stray file: refused
    path2, _ = _sharded(tmp_path, 15)
    (path2 / "stray.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unlisted"):
        ckpt.load(path2)
    (path2 / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="no readable SHA256SUMS"):
        ckpt.load(path2)
    ckpt.prune(tmp_path, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000015.dcp"]
