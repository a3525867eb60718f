"""Data sources: one vocabulary (scalelab.data.kinds) and one registry of run sources.

* The source names are string constants in exactly one module, the vocabulary; every
  schema that lists them (workflow and run config, provenance) says the same words.
* Each registered run source opens its splits, gives the DataSpec of the data it opens,
  and an identity (provenance's dataset hash) that changes when its inputs change.
"""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from scalelab.data import kinds
from scalelab.data.registry import REGISTRY, DataSource, data_source
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.train.config import from_dict

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "scalelab"
VOCABULARY = SRC / "data" / "kinds.py"
WORDS = frozenset(kinds.STAGE_KINDS + kinds.RUN_SOURCES + kinds.STUDY_SOURCES)


# ----------------------------------------------------------------------- one vocabulary


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string statements: module, class and function docstrings, and the
    attribute docstrings under pydantic fields."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def source_word_constants(path: Path) -> list[tuple[int, str]]:
    """(line, word) of every string constant in ``path`` that is a data-source name."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in WORDS
        and id(node) not in skip
    ]


def test_source_names_are_constants_only_in_the_vocabulary() -> None:
    found = {
        str(p.relative_to(SRC)): hits
        for p in sorted(SRC.rglob("*.py"))
        if (hits := source_word_constants(p))
    }
    found.pop("data/kinds.py", None)
    assert found == {}, f"source names outside {VOCABULARY.name}: {found}"
    own = {w for _, w in source_word_constants(VOCABULARY)}
    assert own == WORDS


def test_the_ast_walk_finds_a_literal_and_skips_docstrings(tmp_path: Path) -> None:
    """The walk above can fail: a comparison with a name is found, a docstring is not."""
    mod = tmp_path / "m.py"
    mod.write_text(
        '"""tokens"""\n\n\nclass C:\n    x: int = 1\n    """staged"""\n\n\n'
        'def f(d):\n    """npz"""\n    return d.source == "tokens"\n'
    )
    assert source_word_constants(mod) == [(11, "tokens")]


def _enum_at(doc: dict, *keys: str) -> list[str]:
    for key in keys:
        doc = doc[key]
    return doc["enum"]


def test_schemas_list_the_vocabulary() -> None:
    """Every schema's source enum is the vocabulary's list, in its order."""
    from scalelab import provenance
    from scalelab.train.config import DataConfig

    for schema in (REPO / "workflow" / "schemas" / "config.schema.yaml",):
        doc = yaml.safe_load(schema.read_text())
        assert _enum_at(doc, "$defs", "DataSection", "properties", "source") == list(
            kinds.STUDY_SOURCES
        ), schema
    run = json.loads((REPO / "workflow" / "schemas" / "run.schema.json").read_text())
    assert _enum_at(run, "$defs", "DataConfig", "properties", "source") == list(kinds.RUN_SOURCES)
    assert run["$defs"]["DataConfig"]["properties"]["source"]["default"] == kinds.RUN_SYNTHETIC
    prov = json.loads(provenance.SCHEMA.read_text())
    assert _enum_at(
        prov, "properties", "incidental", "properties", "data", "properties", "source"
    ) == list(kinds.RUN_SOURCES)
    assert typing.get_args(DataConfig.model_fields["source"].annotation) == kinds.RUN_SOURCES


def test_stage_cli_offers_the_stage_kinds() -> None:
    import argparse

    from scalelab.data.cli import _stage_options

    parser = _stage_options(argparse.ArgumentParser())
    (action,) = [a for a in parser._actions if "--source" in a.option_strings]
    assert tuple(action.choices) == kinds.STAGE_KINDS


def test_registry_holds_every_run_source_and_only_those() -> None:
    assert tuple(REGISTRY) == kinds.RUN_SOURCES
    for name, source in REGISTRY.items():
        assert isinstance(source, DataSource)
        assert source.name == name and data_source(name) is source
    assert tuple(n for n, s in REGISTRY.items() if s.generated) == kinds.GENERATED_RUN_SOURCES
    with pytest.raises(UsageError, match="field 'data.source': unknown source 'imagefolder'"):
        data_source(kinds.IMAGEFOLDER)


def test_study_sources_map_to_run_sources() -> None:
    """A staged study source trains on `staged`; a generated one keeps its name, and is a
    generated run source (nothing staged, no path)."""
    for kind in kinds.STAGE_KINDS:
        assert kinds.run_source(kind) == kinds.STAGED
    for name in kinds.GENERATED_STUDY_SOURCES:
        assert kinds.run_source(name) == name
        assert data_source(name).generated
    assert set(kinds.STUDY_SOURCES) == set(kinds.STAGE_KINDS) | set(kinds.GENERATED_STUDY_SOURCES)
    with pytest.raises(UsageError, match="field 'data.source': 'memory-npz' is not one of"):
        kinds.run_source(kinds.MEMORY_NPZ)


def test_only_generated_sources_go_without_a_path() -> None:
    for name, source in REGISTRY.items():
        model = {"model": {"name": "gpt"}} if name == kinds.TOKENS else {}
        cfg = {**model, "data": {"source": name}}
        if source.generated:
            from_dict(cfg)
        else:
            with pytest.raises(UsageError, match="data.path"):
                from_dict(cfg)


# ----------------------------------------------------------------------- each source

STAGE_SHAPE = (3, 8, 8)


def _stage(out: Path, seed: int) -> Path:
    from scalelab.data.stage import StageConfig, stage

    stage(
        StageConfig(
            kinds.STAGE_SYNTHETIC,
            out,
            seed=seed,
            num_samples=200,
            num_classes=4,
            image_size=STAGE_SHAPE[1:],
            force=True,
            progress=False,
        )
    )
    return out


def _npz(out: Path, seed: int, classes: int = 5) -> Path:
    from scalelab.data.memory import save_npz

    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (rng.integers(0, 255, (n, 1, 6, 6), dtype=np.uint8), rng.integers(0, classes, n))

    save_npz(out, {"train": split(40), "val": split(8)}, classes)
    return out


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {kinds.STAGED: _stage(root / "staged", 0), kinds.MEMORY_NPZ: _npz(root / "d.npz", 0)}


def config(name: str, disk: dict[str, Path], **data: typing.Any) -> typing.Any:
    seed = data.pop("seed", 3)
    base: dict[str, typing.Any] = {"source": name}
    model = {"name": "cnn"}
    if name == kinds.TOKENS:
        model = {"name": "gpt"}
        base.update(num_samples=64, val_samples=16, seq_len=12, vocab_size=20)
    elif name == kinds.RUN_SYNTHETIC:
        base.update(num_samples=64, val_samples=16, num_classes=3, image_shape=[2, 5, 7])
    else:
        base["path"] = str(disk[name])
    return from_dict({"seed": seed, "model": model, "data": {**base, **data}})


@pytest.mark.parametrize("name", kinds.RUN_SOURCES)
def test_each_source_opens_splits_that_fit_its_spec(name: str, disk: dict[str, Path]) -> None:
    cfg = config(name, disk)
    source = data_source(name)
    train, val = source.open(cfg)
    spec = source.spec(cfg)
    assert spec == DataSpec.of(train) == DataSpec.of(val)
    x, y = train.get_batch(np.arange(4))
    assert x.shape[1:] == spec.input_shape
    assert y.min() >= 0 and y.max() < spec.num_outputs
    if name == kinds.TOKENS:
        assert x.dtype == np.int64 and x.max() < spec.num_outputs
    expected = {
        kinds.RUN_SYNTHETIC: DataSpec(3, (2, 5, 7)),
        kinds.TOKENS: DataSpec(20, (12,)),
        kinds.STAGED: DataSpec(4, STAGE_SHAPE),
        kinds.MEMORY_NPZ: DataSpec(5, (1, 6, 6)),
    }
    assert spec == expected[name]
    _, none = source.open(config(name, disk, val_split=None))
    assert none is None


@pytest.mark.parametrize("name", kinds.RUN_SOURCES)
def test_each_source_has_a_test_split_only_when_generated(name: str, disk: dict[str, Path]) -> None:
    cfg = config(name, disk)
    source = data_source(name)
    test = source.test_split(cfg)
    if not source.generated:
        assert test is None  # on disk: `evaluate --data` opens the staged test split
        return
    train, val = source.open(cfg)
    assert len(test) == cfg.data.val_samples and DataSpec.of(test) == source.spec(cfg)
    # the same generator at ids neither training nor validation uses
    assert (train.first_index, val.first_index, test.first_index) == (
        0,
        len(train),
        len(train) + len(val),
    )
    assert type(test) is type(train) and test.seed == train.seed == cfg.seed


#: source -> data-field changes that each must change its identity
GENERATED_INPUTS = {
    kinds.RUN_SYNTHETIC: [
        {"seed": 4},
        {"num_samples": 65},
        {"val_samples": 17},
        {"num_classes": 4},
        {"image_shape": [2, 5, 6]},
        {"signal": 0.6},
    ],
    kinds.TOKENS: [
        {"seed": 4},
        {"num_samples": 65},
        {"val_samples": 17},
        {"seq_len": 13},
        {"vocab_size": 21},
    ],
}


@pytest.mark.parametrize("name", sorted(GENERATED_INPUTS))
def test_generated_identity_changes_with_each_input(name: str, disk: dict[str, Path]) -> None:
    source = data_source(name)
    base = source.identity(config(name, disk))
    assert base == source.identity(config(name, disk))
    assert base["source"] == name and base["path"] is None
    digests = [
        source.identity(config(name, disk, **change))["sha256"] for change in GENERATED_INPUTS[name]
    ]
    assert base["sha256"] not in digests and len(set(digests)) == len(digests)


def test_file_identity_changes_with_the_contents(tmp_path: Path, disk: dict[str, Path]) -> None:
    """Same path, new contents: a new sha256 (the staged manifest's, the .npz file's)."""
    from scalelab.fsio import sha256_file

    for name, make, where in ((kinds.STAGED, _stage, "staged"), (kinds.MEMORY_NPZ, _npz, "x.npz")):
        path = make(tmp_path / where, 0)
        cfg = config(name, {name: path})
        source = data_source(name)
        first = source.identity(cfg)
        assert first["path"] == str(path.resolve()) and first["source"] == name
        hashed = path / "manifest.json" if name == kinds.STAGED else path
        assert first["sha256"] == sha256_file(hashed)
        make(path, 1)
        assert source.identity(cfg)["sha256"] not in (first["sha256"], None)
    missing = data_source(kinds.STAGED).identity(
        config(kinds.STAGED, {kinds.STAGED: tmp_path / "nope"})
    )
    assert missing["sha256"] is None and missing["file"] == "manifest.json"


def test_identity_is_the_provenance_dataset_hash(disk: dict[str, Path]) -> None:
    from scalelab import sysfacts

    for name in kinds.RUN_SOURCES:
        cfg = config(name, disk)
        assert sysfacts.dataset_hash(cfg) == data_source(name).identity(cfg)


def test_generated_identities_keep_their_recorded_values() -> None:
    """The dataset hashes of runs recorded before the registry existed stay the same."""
    from scalelab import sysfacts

    synthetic = sysfacts.dataset_hash(from_dict({}))
    assert synthetic == {
        "source": "synthetic",
        "path": None,
        "sha256": "71addd66e9abe26d9be30a6f69aa3eef90bfc5ac068d4cf3e0d6d94e54a11941",
    }
    tokens = sysfacts.dataset_hash(
        from_dict(
            {
                "model": {"name": "gpt"},
                "data": {"source": "tokens", "seq_len": 16, "vocab_size": 32},
            }
        )
    )
    assert tokens == {
        "source": "tokens",
        "path": None,
        "sha256": "b52bf20844e99e35b041cead7ee4538be7910b5d6321231ad116f747ebf66718",
    }
