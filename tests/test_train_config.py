"""RunConfig: strict YAML loading, overrides, batch arithmetic, documentation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.errors import UsageError
from scalelab.train import batch as B
from scalelab.train import config as C


def test_defaults_are_valid() -> None:
    cfg = C.load(None)
    assert cfg.model.name == "cnn" and cfg.dist.backend == "auto"
    plan = B.resolve_batch(cfg, 1)
    assert (plan.global_batch, plan.per_rank_batch, plan.lr) == (256, 256, cfg.optim.lr)


def test_every_field_has_a_docstring() -> None:
    for cls in C.sections():
        docs = C.field_docs(cls)
        missing = [name for name in cls.model_fields if not docs.get(name)]
        assert not missing, f"{cls.__name__}: fields without docstring: {missing}"


def test_json_schema_is_generated_from_the_models_and_committed() -> None:
    """The workflow's copy of the run-config schema is the generated one (no drift)."""
    schema = C.json_schema()
    assert schema["properties"]["optim"]["$ref"] == "#/$defs/OptimConfig"
    lr = schema["$defs"]["OptimConfig"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and "finite" in lr["description"]
    committed = json.loads(
        (Path(__file__).parents[1] / "workflow" / "schemas" / "run.schema.json").read_text()
    )
    assert committed == schema, "regenerate: scalelab plan --write-schema"


def test_explain_lists_every_leaf() -> None:
    text = "\n".join(C.explain())
    for path in (
        "optim.global_batch_size:",
        "dist.horovod.compression: none",
        "train.deterministic: false",
        "checkpoint.keep: 2",
    ):
        assert path in text


@pytest.mark.parametrize(
    "tree, field",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"global_batch_size": 32.5}}, "optim.global_batch_size"),
        ({"optim": {"global_btach_size": 32}}, "optim.global_btach_size"),
        ({"trian": {}}, "trian"),
        ({"train": {"deterministic": "yes"}}, "train.deterministic"),
        ({"dist": {"backend": "nccl"}}, "dist.backend"),
        ({"dist": {"horovod": {"compression": "int8"}}}, "dist.horovod.compression"),
        ({"data": {"image_shape": [3, 32]}}, "data.image_shape"),
        ({"data": {"image_shape": [3, "32", 32]}}, "data.image_shape[1]"),
        ({"data": {"source": "memory-npz"}}, "data.path"),
        ({"model": {"name": "alexnet"}}, "model.name"),
        ({"model": {"options": {"depht": 50}, "name": "resnet"}}, "model.options.depht"),
        (
            {"optim": {"global_batch_size": 64, "per_rank_batch_size": 32}},
            "optim.per_rank_batch_size",
        ),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"dist": {"timeout_s": -1}}, "dist.timeout_s"),
        ({"optim": 5}, "optim"),
        ({"optim": {"lr": float("nan")}}, "optim.lr"),
        ({"optim": {"lr": float("inf")}}, "optim.lr"),
        ({"optim": {"momentum": -0.1}}, "optim.momentum"),
        ({"optim": {"momentum": 1.5}}, "optim.momentum"),
        ({"optim": {"momentum": float("nan")}}, "optim.momentum"),
        ({"optim": {"gamma": 0}}, "optim.gamma"),
        ({"optim": {"gamma": float("inf")}}, "optim.gamma"),
        ({"optim": {"weight_decay": float("nan")}}, "optim.weight_decay"),
        ({"optim": {"milestones": [5, 2]}}, "optim.milestones"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_fields_are_named(tree: dict, field: str) -> None:
    with pytest.raises(UsageError) as err:
        C.from_dict(tree)
    assert f"field '{field}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_typos_get_a_suggestion() -> None:
    with pytest.raises(UsageError, match=r"did you mean 'global_batch_size'"):
        C.from_dict({"optim": {"global_btach_size": 32}})
    with pytest.raises(UsageError, match=r"did you mean 'resnet'"):
        C.from_dict({"model": {"name": "resnt"}})
    with pytest.raises(UsageError, match=r"field 'train.optim.lr'"):
        C.from_dict({"optim": {"lr": "fast"}}, prefix="train.")


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: resnet, options: {depth: 18}}\noptim:\n  lr: 0.2\n")
    cfg = C.load(
        path,
        [
            "optim.lr=0.4",
            "train.epochs=3",
            "data.val_split=null",
            "dist.horovod.fusion_threshold_mb=64",
            "data.image_shape=[1, 28, 28]",
        ],
    )
    assert cfg.model.options == {"depth": 18}
    assert (cfg.optim.lr, cfg.train.epochs, cfg.data.val_split) == (0.4, 3, None)
    assert cfg.dist.horovod.fusion_threshold_mb == 64.0
    assert cfg.data.image_shape == [1, 28, 28]
    with pytest.raises(UsageError, match="key.path=value"):
        C.load(path, ["optim.lr"])
    with pytest.raises(UsageError, match="field 'optim.lr.x'"):
        C.load(path, ["optim.lr.x=1"])
    with pytest.raises(UsageError, match="--config"):
        C.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UsageError, match="mapping"):
        C.load(tmp_path / "list.yaml")


def test_batch_plan_and_linear_scaling() -> None:
    cfg = C.from_dict(
        {
            "optim": {
                "global_batch_size": 512,
                "grad_accum_steps": 2,
                "lr": 0.1,
                "base_batch_size": 256,
            }
        }
    )
    plan = B.resolve_batch(cfg, 4)
    assert (plan.global_batch, plan.per_rank_batch, plan.micro_batch) == (512, 128, 64)
    assert plan.lr == pytest.approx(0.2)
    per_rank = C.from_dict({"optim": {"per_rank_batch_size": 64, "base_batch_size": 64}})
    plan = B.resolve_batch(per_rank, 8)
    assert (plan.global_batch, plan.per_rank_batch, plan.lr) == (512, 64, pytest.approx(0.8))


def test_batch_not_divisible() -> None:
    cfg = C.from_dict({"optim": {"global_batch_size": 96, "grad_accum_steps": 4}})
    B.resolve_batch(cfg, 3)  # 96 = 3 * 4 * 8
    with pytest.raises(UsageError, match=r"field 'optim.global_batch_size': 96 .* 5 \* 4"):
        B.resolve_batch(cfg, 5)
    cfg = C.from_dict({"optim": {"per_rank_batch_size": 30, "grad_accum_steps": 4}})
    with pytest.raises(UsageError, match="field 'optim.per_rank_batch_size'"):
        B.resolve_batch(cfg, 2)


def test_explain_lists_every_registered_model():
    """model.name's text (what --explain and the schema show) names exactly the registry's
    models: a new model that is not documented fails here."""
    import re

    from scalelab.models import model_names
    from scalelab.train.config import ModelConfig, field_docs

    listed = set(re.findall(r"[a-z][a-z0-9]*", field_docs(ModelConfig)["name"].split(":")[1]))
    assert listed - {"or"} == set(model_names())
