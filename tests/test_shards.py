"""The shard reader: ArrayDataset behaviour and verification at open (training) time."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from stage_helpers import copy_dataset, flip_byte, stage_digits, truncate

from scalelab.data.base import ArrayDataset
from scalelab.data.shards import open_split
from scalelab.data.stage import StageConfig, stage
from scalelab.errors import DataError, UsageError


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Synthetic data in several shards per split."""
    out = tmp_path_factory.mktemp("multi") / "syn"
    stage(
        StageConfig(
            "synthetic",
            out,
            num_samples=400,
            num_classes=5,
            image_size=(4, 4),
            shards=8,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return stage_digits(tmp_path_factory.mktemp("digits") / "digits")


def _train_images_shard(data_dir):
    index = json.loads((data_dir / "index.json").read_text())
    return data_dir / index["splits"]["train"]["shards"][0]["images"]


def test_is_an_array_dataset_and_batches_keep_order_across_shards(multi):
    ds = open_split(multi, "train")
    assert isinstance(ds, ArrayDataset)
    index = json.loads((multi / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and len(ds) == index["splits"]["train"]["count"]
    # reference: every shard loaded whole, concatenated
    ref = np.concatenate([np.load(multi / s["images"]) for s in shards])
    ref_labels = np.concatenate([np.load(multi / s["labels"]) for s in shards])
    idx = np.random.default_rng(0).permutation(len(ds))[:57]
    idx[3] = idx[10]  # repeats are allowed
    raw, labels = ds.raw_batch(idx)
    np.testing.assert_array_equal(raw, ref[idx])
    np.testing.assert_array_equal(labels, ref_labels[idx])
    images, labels2 = ds.get_batch(idx)
    assert images.dtype == np.float32 and images.shape == (57, 3, 4, 4)
    assert labels2.dtype == np.int64
    mean = np.asarray(ds.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(ds.std, np.float32).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(images, (ref[idx] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_empty_and_out_of_range_indices(multi):
    ds = open_split(multi, "val")
    images, labels = ds.get_batch(np.array([], dtype=np.int64))
    assert images.shape == (0, 3, 4, 4) and labels.shape == (0,)
    with pytest.raises(IndexError):
        ds.get_batch(np.array([len(ds)]))
    with pytest.raises(IndexError):
        ds.get_batch(np.array([-1]))


def test_pickles_for_dataloader_workers(multi):
    ds = open_split(multi, "train")
    ds.get_batch(np.arange(5))  # maps some shards
    clone = pickle.loads(pickle.dumps(ds))
    for a, b in zip(ds.get_batch(np.arange(30)), clone.get_batch(np.arange(30)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_altered_shard_is_caught_at_open(digits, tmp_path):
    data = copy_dataset(digits, tmp_path / "d")
    shard = _train_images_shard(data)
    flip_byte(shard)
    with pytest.raises(DataError, match="sha256 mismatch") as exc:
        open_split(data, "train")
    assert str(shard) in str(exc.value) and "\n" not in str(exc.value)
    open_split(data, "val")  # other splits' files are untouched and still open


def test_truncated_shard_is_caught_at_open_with_and_without_hashing(digits, tmp_path):
    data = copy_dataset(digits, tmp_path / "d")
    shard = _train_images_shard(data)
    truncate(shard)
    for verify in (True, False):
        with pytest.raises(DataError, match="truncated") as exc:
            open_split(data, "train", verify=verify)
        assert str(shard) in str(exc.value)


def test_altered_index_and_missing_manifest(digits, tmp_path):
    data = copy_dataset(digits, tmp_path / "d")
    index = data / "index.json"
    index.write_text(index.read_text().replace('"count": 179', '"count": 178', 1))
    with pytest.raises(DataError, match="index.json"):
        open_split(data, "train")
    (data / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_split(data, "train")


def test_unknown_split_and_missing_dir(digits, tmp_path):
    with pytest.raises(DataError, match="no split 'validation'"):
        open_split(digits, "validation")
    with pytest.raises(UsageError, match="no such dataset directory"):
        open_split(tmp_path / "absent", "train")
