"""``scalelab data verify``: every checksum and the index, one-line errors."""

from __future__ import annotations

import json

import pytest
from stage_helpers import copy_dataset, flip_byte, run_cli, stage_digits, truncate

from scalelab.data.manifest import dumps
from scalelab.data.verify import verify_dataset
from scalelab.errors import DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return stage_digits(tmp_path_factory.mktemp("digits") / "digits", shards=6)


@pytest.fixture
def data(digits, tmp_path):
    return copy_dataset(digits, tmp_path / "d")


def _one_line_failure(args, *needles, code=1):
    """A failed check exits 1 (a path that is not there at all is bad usage: 2)."""
    rc, out, err = run_cli("data", "verify", *args, "--quiet")
    assert rc == code, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("scalelab data: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_intact_dataset_passes(data):
    rc, out, err = run_cli("data", "verify", data, "--quiet")
    assert rc == 0, err
    assert out.startswith(f"OK {data}: ") and "train 1439, val 179, test 179" in out
    report = verify_dataset(data, progress=False)
    assert report.files == len(list(data.rglob("*.npy"))) + 2  # + index + manifest
    assert report.hashed


def test_altered_shard(data):
    shard = sorted((data / "val").glob("*.images.npy"))[-1]
    flip_byte(shard, offset=200)
    _one_line_failure([data], str(shard), "sha256 mismatch")
    verify_dataset(data, hash_contents=False, progress=False)  # --quick sees sizes only


def test_truncated_shard_also_with_quick(data):
    shard = sorted((data / "train").glob("*.labels.npy"))[0]
    truncate(shard)
    _one_line_failure([data], str(shard), "truncated")
    _one_line_failure([data, "--quick"], str(shard), "truncated")


def test_missing_shard_and_several_problems(data):
    shards = sorted((data / "train").glob("*.images.npy"))
    shards[0].unlink()
    flip_byte(shards[1])
    line = _one_line_failure([data], "missing")
    assert "1 more problem" in line


def test_altered_index_is_caught_by_its_checksum(data):
    index = data / "index.json"
    index.write_text(index.read_text().replace('"seed": 0', '"seed": 1'))
    _one_line_failure([data], str(index), "sha256 mismatch")


def test_index_inconsistent_with_shards_even_with_a_matching_manifest(data):
    """A hand-edited index whose manifest was regenerated is still caught."""
    import hashlib

    index_path = data / "index.json"
    index = json.loads(index_path.read_text())
    index["splits"]["val"]["class_counts"][0] += 1
    raw = dumps(index)
    index_path.write_bytes(raw)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["files"]["index.json"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (data / "manifest.json").write_bytes(dumps(manifest))
    _one_line_failure([data], "splits.val.class_counts")


def test_not_a_dataset(tmp_path):
    _one_line_failure([tmp_path / "absent"], "no such dataset directory", code=2)
    (tmp_path / "empty").mkdir()  # not a dataset at all: bad input, 2 (issue 23; was 1)
    _one_line_failure([tmp_path / "empty"], "not a staged dataset", code=2)
    with pytest.raises(DataError):
        verify_dataset(tmp_path / "empty", progress=False)


def test_json_verdict_intact_and_corrupt(data):
    """--json: one document on stdout with the verdict, the exit code of the human form."""
    rc, out, err = run_cli("data", "verify", data, "--json")
    verdict = json.loads(out)
    assert rc == 0, err
    assert verdict["ok"] is True and verdict["problems"] == [] and verdict["hashed"] is True
    assert verdict["counts"] == {"train": 1439, "val": 179, "test": 179}
    assert verdict["files"] == len(list(data.rglob("*.npy"))) + 2
    shards = sorted((data / "train").glob("*.images.npy"))
    shards[0].unlink()
    flip_byte(shards[1])
    rc_human = run_cli("data", "verify", data, "--quiet")[0]
    rc, out, err = run_cli("data", "verify", data, "--json")
    verdict = json.loads(out)
    assert rc == rc_human == verdict["exit_code"] == 1
    assert verdict["ok"] is False and len(verdict["problems"]) == 2
    assert any(str(shards[0]) in p and "missing" in p for p in verdict["problems"])
    assert any(str(shards[1]) in p and "sha256 mismatch" in p for p in verdict["problems"])
    assert [ln for ln in err.splitlines() if ": error: " in ln] == [
        f"scalelab data: error: {verdict['error']}"
    ]
