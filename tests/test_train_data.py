"""Datasets of the trainer (in-memory, synthetic) and the per-rank data order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scalelab.data.base import ArrayDataset
from scalelab.data.memory import InMemoryDataset, load_npz, save_npz
from scalelab.data.synthetic import SyntheticDataset
from scalelab.errors import DataError
from scalelab.train.sampling import epoch_order, eval_shard, rank_batches


def test_in_memory_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(10) % 3
    ds = InMemoryDataset(images, labels)
    assert isinstance(ds, ArrayDataset)
    assert (len(ds), ds.num_classes, ds.image_shape) == (10, 3, (1, 4, 4))
    x, y = ds.get_batch(np.array([4, 1]))
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x, images[[4, 1]] / 255, rtol=1e-6)
    np.testing.assert_array_equal(y, [1, 1])

    save_npz(tmp_path / "d.npz", {"train": (images, labels), "val": (images[:2], labels[:2])}, 5)
    val = load_npz(tmp_path / "d.npz", "val")
    assert (len(val), val.num_classes) == (2, 5)
    with pytest.raises(DataError, match="test_images"):
        load_npz(tmp_path / "d.npz", "test")
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz", "train")


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((3, 4, 4), np.float32), np.zeros(3, np.int64), "N, C, H, W"),
        (np.zeros((3, 1, 4, 4), np.float32), np.zeros(2, np.int64), "labels must have shape"),
        (np.zeros((3, 1, 4, 4), np.float32), np.array([0, 1, 5]), r"\[0, 2\)"),
        (np.zeros((3, 1, 4, 4), np.int32), np.zeros(3, np.int64), "uint8 or float"),
    ],
)
def test_in_memory_rejects_bad_arrays(images, labels, message) -> None:
    with pytest.raises(DataError, match=message):
        InMemoryDataset(images, labels, num_classes=2 if "0, 2" in message else None)


def test_synthetic_is_seeded_and_on_the_fly() -> None:
    a = SyntheticDataset(10**9, 10, (3, 8, 8), seed=1)  # a billion samples: nothing stored
    b = SyntheticDataset(10**9, 10, (3, 8, 8), seed=1)
    c = SyntheticDataset(10**9, 10, (3, 8, 8), seed=2)
    idx = np.array([5, 999_999_999, 0, 5])
    xa, ya = a.get_batch(idx)
    xb, yb = b.get_batch(idx)
    assert xa.shape == (4, 3, 8, 8) and xa.dtype == np.float32
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(xa[0], xa[3])
    assert not np.array_equal(c.get_batch(idx)[0], xa)
    counts = np.bincount(a.labels_of(np.arange(20_000)), minlength=10)
    assert counts.min() > 1700  # roughly balanced classes
    val = SyntheticDataset(100, 10, (3, 8, 8), seed=1, first_index=10**9 - 100)
    np.testing.assert_array_equal(val.get_batch(np.array([99]))[0], a.get_batch(idx[1:2])[0])
    with pytest.raises(IndexError):
        SyntheticDataset(5, 2, (1, 2, 2)).get_batch(np.array([5]))


def test_rank_slices_form_the_global_batch() -> None:
    order = epoch_order(seed=3, epoch=1, num_samples=100)
    assert sorted(order) == list(range(100))
    assert not np.array_equal(order, epoch_order(3, 2, 100))  # reshuffled per epoch
    np.testing.assert_array_equal(order, epoch_order(3, 1, 100))
    one = list(rank_batches(order, 0, 5, 20, rank=0, per_rank=20))
    two = [list(rank_batches(order, 0, 5, 20, rank=r, per_rank=10)) for r in range(2)]
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([two[0][step], two[1][step]]), one[step])
    resumed = list(rank_batches(order, 3, 5, 20, rank=1, per_rank=10))
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(two[1][3:]))


def test_eval_shards_cover_everything_once() -> None:
    for world in (1, 2, 3, 7):
        shards = [eval_shard(100, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(100))


# --------------------------------------------------------------------------- default task


def test_class_patterns_are_deterministic_bounded_and_confused_at_the_stated_rate():
    from scalelab.data.synthetic import ClassPatterns

    gen = ClassPatterns(10, (3, 8, 8), seed=5)
    ids = np.arange(20000)
    labels = ids % 10
    a, b = gen.images(ids[:50], labels[:50]), gen.images(ids[:50], labels[:50])
    np.testing.assert_array_equal(a, b)  # a function of (seed, id)
    assert a.dtype == np.uint8 and a.shape == (50, 3, 8, 8)
    # 15% of the images show another class's pattern (1/10 of those by chance their own)
    h = gen.images(ids, labels).reshape(len(ids), -1).astype(float)
    own = gen._patterns[-1].astype(float)  # strongest pattern of each class
    guess = np.argmax(h @ (own - own.mean(1, keepdims=True)).T, axis=1)
    agree = float(np.mean(guess == labels))
    assert 0.6 < agree < 0.9, agree  # faint levels and confusion: neither trivial nor random
    with pytest.raises(ValueError):
        ClassPatterns(10, (3, 8, 8), seed=0, amplitude=300)


def test_default_task_learnable_but_not_trivial(tmp_path: Path) -> None:
    """The shipped config's data and training: epoch-1 val accuracy in [0.4, 0.9], rising."""
    import json

    import yaml
    from conftest import REPO, VENV_BIN, run

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    d = cfg["data"]
    scalelab = str(VENV_BIN / "scalelab")
    run(
        [
            scalelab,
            "data",
            "stage",
            "--source",
            d["source"],
            "--seed",
            str(d["seed"]),
            "--split",
            ",".join(map(str, d["split"])),
            "--shards",
            str(d["shards"]),
            "--image-size",
            str(d["image_size"]),
            str(d["image_size"]),
            "--num-samples",
            str(d["num_samples"]),
            "--num-classes",
            str(d["num_classes"]),
            "--quiet",
            "--out",
            str(tmp_path / "data"),
        ],
        timeout=300,
    )
    t = cfg["train"]
    sets = [
        f"seed={t['seed']}",
        "data.source=staged",
        f"data.path={tmp_path / 'data'}",
        "train.threads=1",
        *(f"optim.{k}={v}" for k, v in t["optim"].items()),
        *(f"train.{k}={str(v).lower()}" for k, v in t["train"].items()),
        f"model.name={t['model']['name']}",
    ]
    run(
        [
            scalelab,
            "train",
            *(a for s in sets for a in ("--set", s)),
            "--out",
            str(tmp_path / "run"),
        ],
        timeout=600,
    )
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    acc = [e["val_acc"] for e in epochs if e["kind"] == "epoch"]
    assert len(acc) == t["train"]["epochs"] >= 3
    assert 0.4 <= acc[0] <= 0.9, acc
    assert acc[-1] > acc[0] and max(acc[1:]) > acc[0], acc
