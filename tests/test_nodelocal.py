"""Node-local staging: copy once per node, verify, reuse, fall back when scratch is small."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from stage_helpers import copy_dataset, flip_byte, run_cli, stage_digits

from scalelab.data import shards as shards_mod
from scalelab.data.nodelocal import (
    local_target,
    localize,
    localize_report,
    node_lock,
    scratch_root,
)
from scalelab.data.shards import LOCAL_MARKER, open_split
from scalelab.data.verify import verify_dataset
from scalelab.errors import DataError

CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from scalelab.data.nodelocal import localize_report
r = localize_report(sys.argv[1], sys.argv[2], reserve_bytes=0, progress=False)
print(r.action, r.path, flush=True)
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The dataset on the 'shared filesystem'."""
    return stage_digits(tmp_path_factory.mktemp("shared") / "digits", shards=4)


def test_copies_verifies_then_reuses(shared, tmp_path):
    scratch = tmp_path / "scratch"
    first = localize_report(shared, scratch, reserve_bytes=0, progress=False)
    assert first.action == "copied"
    assert first.path.parent == scratch / "scalelab-data"
    assert first.path == local_target(shared, scratch)[0]
    verify_dataset(first.path, progress=False)
    marker = json.loads((first.path / LOCAL_MARKER).read_text())
    assert marker["source"] == str(shared)
    mtimes = {p: p.stat().st_mtime_ns for p in first.path.rglob("*.npy")}
    second = localize_report(shared, scratch, reserve_bytes=0, progress=False)
    assert second.action == "reused" and second.path == first.path
    assert {p: p.stat().st_mtime_ns for p in first.path.rglob("*.npy")} == mtimes
    assert not list((scratch / "scalelab-data").glob(".*"))  # no temporary dirs left


def test_concurrent_processes_copy_once(shared, tmp_path):
    scratch = tmp_path / "scratch"
    target, lock = local_target(shared, scratch)
    lock.parent.mkdir(parents=True)
    with node_lock(lock, timeout=10):  # hold the node's lock until both are waiting on it
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(shared), str(scratch)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            for p in procs:
                assert "waiting for" in p.stderr.readline()
            assert not target.exists()
        except BaseException:
            for p in procs:
                p.kill()
            raise
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    actions = sorted(out.split()[0] for out, _ in results)
    assert actions == ["copied", "reused"]
    assert {out.split()[1] for out, _ in results} == {str(target)}
    verify_dataset(target, progress=False)


def test_falls_back_to_shared_copy_when_scratch_is_too_small(shared, tmp_path, caplog):
    scratch = tmp_path / "scratch"
    with caplog.at_level(logging.WARNING, logger="scalelab.data.nodelocal"):
        result = localize_report(shared, scratch, reserve_bytes=1 << 60, progress=False)
    assert result.action == "fallback" and result.path == shared
    assert "reading from the shared copy" in caplog.text and str(scratch) in caplog.text
    assert not local_target(shared, scratch)[0].exists()


def test_in_place_when_already_on_scratch(tmp_path):
    scratch = tmp_path / "scratch"
    data = stage_digits(scratch / "mine")
    result = localize_report(data, scratch, progress=False)
    assert result.action == "in-place" and result.path == data
    assert not (scratch / "scalelab-data").exists()


def test_corrupt_shared_copy_is_not_published(shared, tmp_path):
    bad = copy_dataset(shared, tmp_path / "bad")
    shard = sorted((bad / "train").glob("*.images.npy"))[0]
    flip_byte(shard)
    scratch = tmp_path / "scratch"
    with pytest.raises(DataError) as exc:
        localize(bad, scratch, reserve_bytes=0, progress=False)
    assert str(shard) in str(exc.value)
    base = scratch / "scalelab-data"
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == []


def test_damaged_local_copy_is_replaced(shared, tmp_path):
    scratch = tmp_path / "scratch"
    path = localize(shared, scratch, reserve_bytes=0, progress=False)
    victim = sorted((path / "val").glob("*.images.npy"))[0]
    victim.unlink()  # e.g. a scratch cleaner removed a file
    again = localize_report(shared, scratch, reserve_bytes=0, progress=False)
    assert again.action == "copied" and again.path == path and victim.exists()
    verify_dataset(path, progress=False)


def test_readers_trust_the_verified_copy_but_not_the_shared_one(shared, tmp_path, monkeypatch):
    local = localize(shared, tmp_path / "scratch", reserve_bytes=0, progress=False)
    hashed = []
    real = shards_mod.check_file

    def spy(data_dir, entry, *, hash_contents=True, on_bytes=None):
        hashed.append((entry.path, hash_contents))
        return real(data_dir, entry, hash_contents=hash_contents, on_bytes=on_bytes)

    monkeypatch.setattr(shards_mod, "check_file", spy)
    n_files = 3 * len(json.loads((shared / "index.json").read_text())["splits"]["train"]["shards"])
    open_split(local, "train")
    assert [h for p, h in hashed if p != "index.json"] == [False] * n_files
    hashed.clear()
    open_split(shared, "train")
    assert all(h for _, h in hashed) and len(hashed) == n_files + 1
    # a truncated local file is still caught (sizes are always checked)
    victim = sorted((local / "train").glob("*.images.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        open_split(local, "train")


def test_scratch_from_argument_then_environment(monkeypatch, tmp_path):
    for var in ("SCALELAB_SCRATCH", "SLURM_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(var, raising=False)
    assert str(scratch_root()) == "/tmp"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    assert scratch_root() == tmp_path / "t"
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "s"))
    assert scratch_root() == tmp_path / "s"
    monkeypatch.setenv("SCALELAB_SCRATCH", str(tmp_path / "x"))
    assert scratch_root() == tmp_path / "x"
    assert scratch_root(tmp_path / "arg") == tmp_path / "arg"


def test_cli_prints_only_the_path(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_SCRATCH", str(tmp_path / "env-scratch"))
    rc, out, err = run_cli("data", "localize", shared, "--reserve", "0", "--quiet")
    assert rc == 0, err
    assert out == f"{local_target(shared, tmp_path / 'env-scratch')[0]}\n"
    rc, out, err = run_cli(
        "data", "localize", shared, "--scratch", tmp_path / "s", "--reserve", "1000TiB", "--quiet"
    )
    assert rc == 0 and out == f"{shared}\n"
    rc, out, err = run_cli("data", "localize", shared, "--reserve", "lots")
    assert rc == 2 and "--reserve: 'lots'" in err and out == ""
