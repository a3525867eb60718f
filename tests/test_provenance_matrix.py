"""Every run kind has provenance: backend x data source x tp, as real tiny runs.

Each run is a real `scalelab train` (one process, torchrun on gloo, or mpirun for
Horovod) of the smallest configs (a tiny CNN on 16x16 images, the tiny GPT on
16-token sequences), capped at 2 steps. Every run directory must end with a
provenance.json that validates against its schema, be listed by `scalelab runs`,
and be accepted by `scalelab reproduce RUN --dry-run` (the manifest loads and
validates, no must-match field differs from this environment or from the run's
own run_info.json, and the rerun command can be built).
"""

from __future__ import annotations

import json
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from train_support import MPIRUN, PY, TINY, TORCHRUN, TRAIN, deep_update, ok, run, write_config

from scalelab import provenance, sysfacts

SCALELAB = [PY, "-m", "scalelab"]
SCHEMA = json.loads(provenance.SCHEMA.read_text())
QUICK = {"train": {"steps_per_epoch": 2, "deterministic": True}, "checkpoint": {"every_epochs": 0}}
CNN = deep_update(TINY, QUICK)
GPT = deep_update(
    QUICK,
    {
        "seed": 11,
        "model": {"name": "gpt", "options": {"size": "tiny"}},
        "data": {
            "source": "tokens",
            "num_samples": 128,
            "val_samples": 32,
            "seq_len": 16,
            "vocab_size": 32,
        },
        "optim": {"name": "sgd", "global_batch_size": 16, "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 1, "threads": 1, "progress": False},
        "metrics": {"warmup_steps": 1},
    },
)

#: backend -> (launcher argv before `-m scalelab train`, ranks)
LAUNCH = {
    "none": ([PY], 1),
    "ddp": (TORCHRUN, 2),
    "fsdp": (TORCHRUN, 2),
    "horovod": ([*MPIRUN, PY], 2),
}
IMAGE_SOURCES = ("synthetic", "memory-npz", "staged")
#: name -> (data source, backend, tp): every backend on every source; tp (gpt only) with
#: the two backends that combine with it.
CASES = {
    **{f"{src}-{be}": (src, be, 1) for src in (*IMAGE_SOURCES, "tokens") for be in LAUNCH},
    "tokens-ddp-tp2": ("tokens", "ddp", 2),
    "tokens-fsdp-tp2": ("tokens", "fsdp", 2),
}


def image_data(root: Path) -> dict[str, str]:
    """A staged dataset and an .npz of the tiny CNN's shape (4 classes, 3x16x16)."""
    from scalelab.data.memory import save_npz
    from scalelab.data.stage import StageConfig, stage

    staged = root / "staged"
    stage(
        StageConfig(
            "synthetic", staged, num_samples=400, num_classes=4, image_size=(16, 16), progress=False
        )
    )
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8),
            rng.integers(0, 4, n, dtype=np.int64),
        )

    npz = root / "data.npz"
    save_npz(npz, {"train": split(128), "val": split(32)}, num_classes=4)
    return {"staged": str(staged), "memory-npz": str(npz)}


def train_argv(root: Path, name: str, paths: dict[str, str]) -> list[str]:
    source, backend, tp = CASES[name]
    cfg = GPT if source == "tokens" else deep_update(CNN, {"data": {"source": source}})
    if source in paths:
        cfg = deep_update(cfg, {"data": {"path": paths[source]}})
    cfg = deep_update(cfg, {"dist": {"backend": backend, "tp": tp}})
    config = write_config(root / f"{name}.yaml", cfg)
    return [
        *LAUNCH[backend][0],
        *TRAIN,
        "--config",
        str(config),
        "--out",
        str(root / "runs" / name),
    ]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """The runs of CASES under ROOT/runs/NAME (one at a time: two ranks fill the CPUs)."""
    root = tmp_path_factory.mktemp("matrix")
    paths = image_data(root)
    for name in CASES:
        ok(run(train_argv(root, name, paths), timeout=180))
    return root / "runs"


def manifest(run_dir: Path) -> dict[str, typing.Any]:
    return json.loads((run_dir / provenance.FILE).read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_every_run_kind_writes_a_valid_manifest(matrix: Path, name: str) -> None:
    source, backend, tp = CASES[name]
    m = manifest(matrix / name)
    jsonschema.Draft202012Validator(SCHEMA).validate(m)
    assert m["incidental"]["data"]["source"] == source
    assert m["incidental"]["data"]["sha256"]  # every source has an identity
    assert m["must_match"]["backend"] == backend and m["config"]["dist"]["tp"] == tp
    assert m["must_match"]["world_size"] == LAUNCH[backend][1]


def test_runs_lists_every_run(matrix: Path) -> None:
    proc = ok(run([*SCALELAB, "runs", str(matrix), "--json"], timeout=120))
    rows = {Path(r["run"]).name: r for r in json.loads(proc.stdout)}
    assert sorted(rows) == sorted(CASES)
    for name, row in rows.items():
        assert row["provenance_id"] == manifest(matrix / name)["provenance_id"]
        assert row["status"] == "completed"


def test_reproduce_dry_run_accepts_every_run(matrix: Path, tmp_path: Path) -> None:
    """Two dry runs at a time: each is a fresh process, as a user's would be."""

    def dry_run(name: str):
        return run(
            [
                *SCALELAB,
                "reproduce",
                str(matrix / name),
                "--dry-run",
                "--out",
                str(tmp_path / name),
            ],
            timeout=120,
        )

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(CASES, pool.map(dry_run, CASES), strict=True))
    failed = {n: p.stderr.strip().splitlines()[-3:] for n, p in procs.items() if p.returncode != 0}
    assert not failed, failed
    for name, proc in procs.items():
        assert proc.stdout.startswith("scalelab reproduce:"), (name, proc.stdout)
        assert not (tmp_path / name).exists()  # a dry run starts nothing


# ----------------------------------------------------------------------------- in-process


def test_token_identity_covers_sequence_length_vocabulary_seed_and_sizes() -> None:
    from scalelab.train.config import from_dict

    def digest(**changes: typing.Any) -> str:
        cfg = deep_update(GPT, {"data": {k: v for k, v in changes.items() if k != "seed"}})
        cfg["seed"] = changes.get("seed", cfg["seed"])
        return sysfacts.dataset_hash(from_dict(cfg))["sha256"]

    base = digest()
    changed = [
        digest(seq_len=32),
        digest(vocab_size=64),
        digest(seed=12),
        digest(num_samples=256),
        digest(val_samples=64),
    ]
    assert base == digest() and base not in changed and len(set(changed)) == len(changed)


def test_sources_and_backends_are_one_vocabulary() -> None:
    """The schema, the identity table and the run config name the same sources and
    backends."""
    from scalelab.backends.config import DistConfig
    from scalelab.train.config import DataConfig

    sources = typing.get_args(DataConfig.model_fields["source"].annotation)
    backends = typing.get_args(DistConfig.model_fields["backend"].annotation)
    data = SCHEMA["properties"]["incidental"]["properties"]["data"]["properties"]["source"]
    must = SCHEMA["properties"]["must_match"]["properties"]["backend"]
    from scalelab.data.registry import REGISTRY

    assert sorted(data["enum"]) == sorted(REGISTRY) == sorted(sources)
    assert sorted(must["enum"]) == sorted(backends)
    assert {s for s, _, _ in CASES.values()} == set(sources)
    assert {b for _, b, _ in CASES.values()} | {"auto"} == set(backends)
