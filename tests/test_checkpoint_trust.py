"""A checkpoint is data from someone else: resuming from it runs no code and takes no
other run's state.

A real distributed checkpoint (``.dcp``) of a tiny one-rank fsdp run is copied into a
fresh run directory and tampered with, its ``SHA256SUMS`` recomputed (they prove
integrity, not origin): a ``.metadata`` pickle whose ``__reduce__`` runs
``touch $TMP/PWNED-<uuid>``, a non-tensor entry holding such a pickle, a storage entry
naming a file outside the checkpoint. Each is refused in one line with exit 1, and the
planted file never appears. A valid checkpoint of another run (another seed, another
lr) is refused naming the field; a layout change passes only under ``--reshard``.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import uuid
from pathlib import Path

import pytest
from reliability import tally_fixtures
from test_sharding import GPT_TINY
from train_support import PY, TRAIN, ok, run, write_config

from scalelab.output_guard import MARKER
from scalelab.train import checkpoint as ckpt
from scalelab.train import dcp_safe

# docs/reliability.md: crafted checkpoints (pickles, storage paths, another run's state).
tally, _count = tally_fixtures(
    "checkpoint-vectors", tried="cases tried", passed="as expected (refused, or read safely)"
)

STEP = 8  # the checkpoint after epoch 1 (8 optimizer steps of 32 of 256 samples)
NAME = f"ckpt-{STEP:09d}.dcp"


class _Touch:
    """Unpickling this runs ``touch PATH``: what a crafted checkpoint would plant."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a finished two-epoch fsdp run at one rank."""
    tmp = tmp_path_factory.mktemp("trust")
    cfg = json.loads(json.dumps(GPT_TINY))
    cfg["train"]["epochs"] = 2
    cfg["dist"] = {"backend": "fsdp"}
    config = write_config(tmp / "gpt.yaml", cfg)
    ok(run([PY, *TRAIN, "--config", str(config), "--out", str(tmp / "whole")], timeout=300))
    assert (tmp / "whole" / "checkpoints" / NAME / ".metadata").is_file()
    return config, tmp / "whole"


def _copy_run(source: Path, target: Path) -> Path:
    """A run directory holding only ``source``'s checkpoint at STEP (a stopped run)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy2(source / MARKER, target / MARKER)
    shutil.copytree(source / "checkpoints" / NAME, target / "checkpoints" / NAME)
    return target / "checkpoints" / NAME


def _resume(config: Path, out: Path, *extra: str):
    return run(
        [PY, *TRAIN, "--config", str(config), "--out", str(out), "--resume", *extra], timeout=300
    )


def _refused(proc, code: int = 1) -> str:
    """The one error line of a refused resume (and nothing trained)."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("scalelab train: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout
    return lines[0]


def _metadata(directory: Path):
    return dcp_safe.read_metadata(directory)


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(source, tmp_path):
    """Issue 23: a .metadata pickle that runs a command, SHA256SUMS recomputed."""
    config, whole = source
    directory = _copy_run(whole, tmp_path / "run")
    planted = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    (directory / dcp_safe.METADATA).write_bytes(pickle.dumps(_Touch(planted)))
    ckpt._write_sums(directory)
    ckpt.verify_dir(directory)  # the checksums match: integrity is not origin
    line = _refused(_resume(config, tmp_path / "run"))
    assert ".metadata: refused to unpickle" in line and "posix.system" in line
    assert not planted.exists()
    assert not (tmp_path / "run" / "summary.json").exists()


def test_crafted_dcp_bytes_entry_is_refused_and_runs_nothing(source, tmp_path):
    """A non-tensor entry (torch reads those with weights_only=False) holding a pickle
    that runs a command: the metadata is valid, the entry is refused."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    config, whole = source
    directory = _copy_run(whole, tmp_path / "run")
    planted = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    payload = pickle.dumps(_Touch(planted))
    (directory / "evil.distcp").write_bytes(payload)
    metadata = _metadata(directory)
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    metadata.storage_data[index] = _StorageInfo("evil.distcp", 0, len(payload))
    (directory / dcp_safe.METADATA).write_bytes(pickle.dumps(metadata))
    ckpt._write_sums(directory)
    line = _refused(_resume(config, tmp_path / "run"))
    assert "optimizer.param_groups.0.lr: refused" in line
    assert not planted.exists()


def test_dcp_storage_entry_outside_the_checkpoint_is_refused(source, tmp_path):
    """A storage entry naming a file outside the checkpoint directory is refused before
    anything is read."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    directory = _copy_run(source[1], tmp_path / "run")
    metadata = _metadata(directory)
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = _StorageInfo("../../../etc/hostname", 0, 8)
    with pytest.raises(dcp_safe.UnsafeCheckpoint, match="not a file of the checkpoint"):
        dcp_safe.load_metadata(pickle.dumps(metadata), directory)


def test_dcp_metadata_allow_list_reads_a_real_checkpoint(source):
    """The allow-list holds what torch writes: the real metadata loads, every entry
    naming one of the checkpoint's own files."""
    directory = source[1] / "checkpoints" / NAME
    metadata = _metadata(directory)
    assert {i.relative_path for i in metadata.storage_data.values()} <= {
        p.name for p in directory.iterdir()
    }
    keys = list(metadata.state_dict_metadata)
    assert any(k.startswith("model.") for k in keys) and "optimizer.param_groups.0.lr" in keys


@pytest.mark.parametrize(
    "change, field",
    [
        ("seed=12", "seed: 11 (checkpoint) != 12 (this run)"),
        ("optim.lr=0.2", "optim.lr: 0.1 (checkpoint) != 0.2 (this run)"),
    ],
    ids=["seed", "lr"],
)
def test_checkpoint_of_another_run_is_refused_naming_the_field(source, tmp_path, change, field):
    """Issue 23: a valid checkpoint copied from another run (another seed, another lr)
    was resumed silently; now one line names the differing field."""
    config, whole = source
    _copy_run(whole, tmp_path / "run")
    line = _refused(_resume(config, tmp_path / "run", "--set", change), code=2)
    assert f"belongs to another run: {field}" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_layout_change_is_refused_unless_reshard(source, tmp_path):
    """The layout (here the backend: fsdp -> ddp at one rank) is exempt only under
    --reshard; then the resume goes ahead and finishes."""
    config, whole = source
    _copy_run(whole, tmp_path / "run")
    line = _refused(_resume(config, tmp_path / "run", "--set", "dist.backend=ddp"), code=2)
    assert "dist.backend: 'fsdp' (checkpoint) != 'ddp' (this run)" in line
    proc = ok(_resume(config, tmp_path / "run", "--set", "dist.backend=ddp", "--reshard"))
    assert f"resumed from {NAME} at epoch 2" in proc.stdout
    # operational fields (threads, checkpoint cadence) may change without --reshard
    _copy_run(whole, tmp_path / "run2")
    ok(
        _resume(
            config, tmp_path / "run2", "--set", "checkpoint.keep=3", "--set", "train.progress=false"
        )
    )
