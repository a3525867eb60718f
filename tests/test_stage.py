"""Staging: real data end to end, imagefolder, synthetic, npz, and bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from stage_helpers import CLASS_COLORS, leftovers, make_imagefolder, run_cli, stage_digits

from scalelab.data.manifest import npy_header
from scalelab.data.shards import open_split
from scalelab.data.stage import StageConfig, stage
from scalelab.data.stageplan import plan_split
from scalelab.data.verify import verify_dataset
from scalelab.errors import DataError, UsageError

SPLITS = ("train", "val", "test")


def _shard_bytes(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*.npy"))}


# --- real data: sklearn digits ----------------------------------------------------------


def test_digits_end_to_end_same_images_and_labels_as_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = stage_digits(tmp_path / "digits")
    report = verify_dataset(data, progress=False)
    assert report.counts == {"train": 1439, "val": 179, "test": 179}

    seen = []
    for split in SPLITS:
        ds = open_split(data, split)
        assert ds.num_classes == 10 and ds.image_shape == (1, 8, 8)
        idx = np.arange(len(ds))
        ids = ds.source_ids(idx)
        images, labels = ds.get_batch(idx)
        assert images.dtype == np.float32 and labels.dtype == np.int64
        assert images.shape == (len(ds), 1, 8, 8)
        np.testing.assert_array_equal(labels, digits.target[ids])
        raw, _ = ds.raw_batch(idx)
        np.testing.assert_array_equal(raw[:, 0], digits.images[ids])
        # undoing the normalization gives sklearn's pixel values (0..16) back
        restored = (images[:, 0] * ds.std[0] + ds.mean[0]) * 16.0
        np.testing.assert_allclose(restored, digits.images[ids], atol=1e-4)
        seen.append(ids)
    all_ids = np.concatenate(seen)
    assert sorted(all_ids.tolist()) == list(range(len(digits.target)))  # each image exactly once

    train_images, _ = open_split(data, "train").get_batch(np.arange(1439))
    assert abs(float(train_images.mean())) < 1e-3
    assert abs(float(train_images.std()) - 1.0) < 1e-3


def test_digits_cli_stages_verifies_and_reports_throughput(tmp_path):
    out = tmp_path / "d"
    rc, stdout, err = run_cli("data", "stage", "--source", "digits", "--out", out, "--quiet")
    assert rc == 0, err
    assert "MB/s" in stdout and "images/s" in stdout and "staged 1797 images" in stdout
    rc, stdout, err = run_cli("data", "verify", out, "--quiet")
    assert rc == 0, err
    assert stdout.startswith(f"OK {out}")
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == [str(c) for c in range(10)]
    assert index["image_shape"] == [1, 8, 8] and index["dtype"] == "uint8"
    assert index["scale"] == 1 / 16


def test_split_is_stratified_with_documented_rounding():
    labels = np.repeat(np.arange(3), [10, 12, 8])
    plan = plan_split(labels, 3, (0.6, 0.2, 0.2), seed=3)
    for c, n in enumerate([10, 12, 8]):
        n_val = math.floor(n * 0.2 + 0.5)
        n_test = math.floor(n * 0.2 + 0.5)
        assert int((labels[plan["val"]] == c).sum()) == n_val
        assert int((labels[plan["test"]] == c).sum()) == n_test
        assert int((labels[plan["train"]] == c).sum()) == n - n_val - n_test
    together = np.concatenate([plan[s] for s in SPLITS])
    assert sorted(together.tolist()) == list(range(30))
    again = plan_split(labels, 3, (0.6, 0.2, 0.2), seed=3)
    other = plan_split(labels, 3, (0.6, 0.2, 0.2), seed=4)
    assert all(np.array_equal(plan[s], again[s]) for s in SPLITS)
    assert not np.array_equal(plan["train"], other["train"])


# --- imagefolder ------------------------------------------------------------------------


def test_imagefolder_classes_counts_splits_and_pixels(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"cat": 10, "dog": 12, "eel": 8})
    out = tmp_path / "staged"
    result = stage(
        StageConfig(
            "imagefolder",
            out,
            path=src,
            image_size=(16, 12),
            split="0.6,0.2,0.2",
            shards=4,
            workers=1,
            progress=False,
        )
    )
    assert result.counts == {"train": 18, "val": 6, "test": 6}
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog", "eel"]
    assert index["image_shape"] == [3, 16, 12]
    assert index["splits"]["train"]["class_counts"] == [6, 8, 4]
    assert index["splits"]["val"]["class_counts"] == [2, 2, 2]
    assert sum(len(index["splits"][s]["shards"]) for s in SPLITS) == 4
    names = (out / "items.txt").read_text().splitlines()
    assert len(names) == 30 and names[0] == "cat/img000.png"
    verify_dataset(out, progress=False)
    colors = np.array([CLASS_COLORS[c] for c in index["classes"]], dtype=np.int64)
    for split in SPLITS:
        ds = open_split(out, split)
        raw, labels = ds.raw_batch(np.arange(len(ds)))
        assert raw.shape == (len(ds), 3, 16, 12)
        # every pixel has its class's color (JPEG may be off by a little)
        diff = np.abs(raw.astype(np.int64) - colors[labels][:, :, None, None])
        assert diff.max() <= 3
        for i, rel in zip(ds.source_ids(np.arange(len(ds))), labels, strict=True):
            assert names[i].split("/")[0] == index["classes"][rel]


def test_imagefolder_same_seed_gives_byte_identical_shards(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"cat": 9, "dog": 7, "eel": 6})

    def run(name: str, seed: int, workers: int) -> Path:
        out = tmp_path / name
        stage(
            StageConfig(
                "imagefolder",
                out,
                path=src,
                image_size=(8, 8),
                seed=seed,
                shards=3,
                workers=workers,
                progress=False,
            )
        )
        return out

    a, b, c = run("a", 0, 1), run("b", 0, 2), run("c", 1, 1)
    assert _shard_bytes(a) == _shard_bytes(b)  # same seed; the worker count does not matter
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert _shard_bytes(a) != _shard_bytes(c)


# --- synthetic and npz --------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_class_signal(tmp_path):
    def run(name: str, seed: int) -> Path:
        out = tmp_path / name
        stage(
            StageConfig(
                "synthetic",
                out,
                num_samples=600,
                num_classes=4,
                image_size=(6, 5),
                channels=3,
                seed=seed,
                shards=5,
                progress=False,
            )
        )
        return out

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert _shard_bytes(a) == _shard_bytes(b)
    assert _shard_bytes(a) != _shard_bytes(c)
    index = json.loads((a / "index.json").read_text())
    assert sum(len(index["splits"][s]["shards"]) for s in SPLITS) == 5
    ds = open_split(a, "train")
    raw, labels = ds.raw_batch(np.arange(len(ds)))
    assert raw.shape[1:] == (3, 6, 5) and set(labels.tolist()) == {0, 1, 2, 3}
    # a learnable class signal (not a trivial one: the default task must not be solved at
    # once): the nearest class mean names the class well above chance (0.25)
    flat = raw.reshape(len(raw), -1).astype(float)
    means = np.stack([flat[labels == k].mean(axis=0) for k in range(4)])
    guess = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(guess == labels) > 0.5


def test_npz_channels_last_arrays(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 50)
    src = tmp_path / "arrays.npz"
    np.savez(src, images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    out = tmp_path / "staged"
    stage(StageConfig("npz", out, path=src, split=(0.6, 0.4, 0.0), progress=False))
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["a", "b", "c"] and index["image_shape"] == [3, 5, 4]
    assert index["splits"]["test"]["count"] == 0
    for split in ("train", "val"):
        ds = open_split(out, split)
        idx = np.arange(len(ds))
        raw, got_labels = ds.raw_batch(idx)
        ids = ds.source_ids(idx)
        np.testing.assert_array_equal(raw, images[ids].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(got_labels, labels[ids])
    assert len(open_split(out, "test")) == 0


def test_npz_ambiguous_layout_needs_an_option(tmp_path):
    src = tmp_path / "a.npz"
    np.savez(src, x=np.zeros((4, 3, 5, 3), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="--layout"):
        stage(StageConfig("npz", tmp_path / "o", path=src, progress=False))
    stage(StageConfig("npz", tmp_path / "o", path=src, layout="nchw", progress=False))
    assert json.loads((tmp_path / "o" / "index.json").read_text())["image_shape"] == [3, 5, 3]


def test_npy_header_is_numpys_and_independent_of_row_count():
    buf = io.BytesIO()
    np.save(buf, np.zeros((5, 3, 8, 8), np.uint8))
    assert buf.getvalue().startswith(npy_header(np.dtype(np.uint8), (5, 3, 8, 8)))
    sizes = {len(npy_header(np.dtype(np.uint8), (n, 3, 224, 224))) for n in (0, 9, 10**9)}
    assert len(sizes) == 1


# --- bad input: one-line error, exit 2, nothing left behind ---------------------------------


def _assert_clean_failure(rc: int, err: str, out: Path, *needles: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scalelab data: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert leftovers(out) == []
    return lines[0]


def test_missing_source_directory(tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_cli(
        "data", "stage", "--source", "imagefolder", "--path", tmp_path / "nope", "--out", out
    )
    _assert_clean_failure(rc, err, out, str(tmp_path / "nope"), "no such directory")


def test_empty_source_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    rc, _, err = run_cli(
        "data", "stage", "--source", "imagefolder", "--path", tmp_path / "empty", "--out", out
    )
    _assert_clean_failure(rc, err, out, str(tmp_path / "empty"), "empty")


def test_source_without_class_folders(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    (src / "a.png").write_bytes(b"x")
    out = tmp_path / "out"
    rc, _, err = run_cli("data", "stage", "--source", "imagefolder", "--path", src, "--out", out)
    _assert_clean_failure(rc, err, out, "no class sub-folders")


def test_class_folder_without_images(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"cat": 3, "dog": 3})
    (src / "empty_class").mkdir()
    (src / "empty_class" / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    rc, _, err = run_cli("data", "stage", "--source", "imagefolder", "--path", src, "--out", out)
    _assert_clean_failure(rc, err, out, str(src / "empty_class"), "no images")


def _with_corrupt(tmp_path: Path) -> Path:
    src = make_imagefolder(tmp_path / "src", {"cat": 8, "dog": 8})
    good = (src / "dog" / "img000.png").read_bytes()
    (src / "dog" / "img001.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    return src


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    src = _with_corrupt(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        "data",
        "stage",
        "--source",
        "imagefolder",
        "--path",
        src,
        "--out",
        out,
        "--image-size",
        "8",
        "8",
        "--max-bad",
        "1",
        "--workers",
        "1",
        "--quiet",
    )
    assert rc == 0, err
    assert "skipped 1 unreadable image" in stdout
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"count": 1, "items": ["dog/img001.png"]}
    assert sum(index["splits"][s]["count"] for s in SPLITS) == 15
    assert sum(c for s in SPLITS for c in index["splits"][s]["class_counts"]) == 15
    verify_dataset(out, progress=False)  # the shard that lost a row is still consistent
    ds = open_split(out, "train")
    assert len(ds.get_batch(np.arange(len(ds)))[0]) == len(ds)


def test_corrupt_image_over_the_limit_fails(tmp_path):
    src = _with_corrupt(tmp_path)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        "data",
        "stage",
        "--source",
        "imagefolder",
        "--path",
        src,
        "--out",
        out,
        "--image-size",
        "8",
        "8",
        "--workers",
        "1",
        "--quiet",
    )
    _assert_clean_failure(rc, err, out, str(src / "dog" / "img001.png"), "--max-bad")


@pytest.mark.parametrize("split", ["0.8,0.1,0.2", "0.5,0.5", "0.9,-0.1,0.2", "a,b,c"])
def test_split_fractions_that_do_not_add_up(tmp_path, split):
    out = tmp_path / "out"
    rc, _, err = run_cli("data", "stage", "--source", "digits", "--out", out, f"--split={split}")
    _assert_clean_failure(rc, err, out, "--split", split)


def test_existing_output_needs_force(tmp_path):
    out = stage_digits(tmp_path / "d")
    before = (out / "manifest.json").read_bytes()
    rc, _, err = run_cli("data", "stage", "--source", "digits", "--out", out)
    assert rc == 2 and "--force" in err
    assert (out / "manifest.json").read_bytes() == before
    rc, _, err = run_cli(
        "data", "stage", "--source", "digits", "--out", out, "--seed", "1", "--force", "--quiet"
    )
    assert rc == 0, err
    assert (out / "manifest.json").read_bytes() != before
    assert leftovers(out) == [out.name]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from scalelab.data import sources

    def broken(self, chunks):
        for n, ids in enumerate(chunks):
            if n == 2:
                raise OSError("disk on fire")
            yield self._load(ids), ids

    monkeypatch.setattr(sources.SyntheticSource, "iter_load", broken)
    monkeypatch.setattr("scalelab.data.stage.CHUNK_BYTES", 1024)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        stage(StageConfig("synthetic", out, num_samples=500, image_size=(8, 8), progress=False))
    assert leftovers(out) == []


def test_bad_options_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--path"):
        stage(StageConfig("imagefolder", tmp_path / "o"))
    with pytest.raises(UsageError, match="--source"):
        stage(StageConfig("mnist", tmp_path / "o"))
    with pytest.raises(UsageError, match="--shards"):
        stage(StageConfig("digits", tmp_path / "o", shards=0, progress=False))
    rc, _, err = run_cli("data", "verify", tmp_path, "--source", "digits")
    assert rc == 2 and err.count("\n") == 1 and "unrecognized arguments: --source" in err
    rc, _, err = run_cli("data", "stage")
    assert rc == 2 and "--source and --out are required" in err
    assert leftovers(tmp_path / "o") == []


def test_sigterm_during_staging_leaves_nothing(tmp_path):
    """scancel / an aborted Snakemake job sends SIGTERM: the partial output is removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalelab",
            "data",
            "stage",
            "--source",
            "synthetic",
            "--num-samples",
            "200000",
            "--image-size",
            "64",
            "64",
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.staging-*/train/*.npy")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert leftovers(out) == []
    assert os.listdir(tmp_path) == []


def test_leftovers_of_killed_runs_are_cleaned(tmp_path):
    import socket

    host = socket.gethostname().split(".")[0]
    stale = tmp_path / f".d.staging-{host}-999999999"
    (stale / "train").mkdir(parents=True)
    stage_digits(tmp_path / "d")
    assert not stale.exists()
    assert leftovers(tmp_path / "d") == ["d"]
