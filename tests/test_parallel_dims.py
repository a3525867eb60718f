"""ParallelDims (the dp x tp layout and its rules) and the backend registry (the one list
of backend names): the rule against an independent statement of it, the batch message
that names the real world size, the schemas against the registry, and no backend name
spelled outside the registry."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from scalelab.backends import (
    AUTO,
    BACKENDS,
    CHOICES,
    REGISTRY,
    ParallelDims,
    choose_backend,
    load_class,
    name_of,
)
from scalelab.backends.parallel_dims import Pipe, Problem
from scalelab.errors import UsageError
from scalelab.layout import Layout
from scalelab.train.batch import resolve_batch
from scalelab.train.config import RunConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "scalelab"

# ----------------------------------------------------------------------------- the rule

#: (model name, options, heads) the matrix runs: a CNN (no tensor-parallel plan), the tiny
#: GPT (its size's heads) and GPTs with 3 and 4 heads.
MODELS = [
    ("cnn", {}, None),
    ("gpt", {}, None),
    ("gpt", {"n_heads": 3, "d_model": 24}, 3),
    ("gpt", {"n_heads": 4, "d_model": 32}, 4),
]


def _tiny_heads() -> int:
    from scalelab.models.gpt_shapes import SIZES

    return SIZES["tiny"][2]


def expected(world: int, tp: int, backend: str, model: str, heads: int | None) -> list[str]:
    """The tensor-parallel rule written out independently of the code under test."""
    if tp == 1:
        return []
    if backend in ("horovod", "none"):
        return [
            f"field 'dist.tp': tensor parallelism (tp={tp}) needs the ddp or fsdp "
            f"backend, not {backend}"
        ]
    if world % tp:
        return [
            f"field 'dist.tp': tp={tp} needs a multiple of {tp} ranks; the launcher started {world}"
        ]
    if model != "gpt":
        return [
            f"field 'dist.tp': model {model!r} has no tensor-parallel plan (tp > 1 supports: gpt)"
        ]
    heads = heads if heads is not None else _tiny_heads()
    if heads % tp:
        return [f"field 'dist.tp': the model's {heads} heads do not split over tp={tp} ranks"]
    return []


@pytest.mark.parametrize("world", range(1, 9))
def test_problems_matrix(world: int) -> None:
    """world x tp 1..4 x every backend choice x every model: the rule, the arithmetic and
    the error :meth:`check` raises."""
    checked = 0
    for tp in range(1, 5):
        dims = ParallelDims.of(world, tp)
        assert dims.fits == (world % tp == 0)
        if dims.fits:
            assert (dims.dp, dims.tp, dims.replicas) == (world // tp, tp, world // tp)
            assert [dims.dp_rank(r) for r in range(world)] == [r // tp for r in range(world)]
        for backend in CHOICES:
            for name, options, heads in MODELS:
                want = expected(world, tp, backend, name, heads)
                assert [str(p) for p in dims.problems(backend, name, options)] == want, (
                    world,
                    tp,
                    backend,
                    name,
                    heads,
                )
                if want:
                    with pytest.raises(UsageError) as err:
                        dims.check(backend, name, options)
                    assert str(err.value) == want[0]
                else:
                    dims.check(backend, name, options)
                checked += 1
    assert checked == 4 * len(CHOICES) * len(MODELS)


def test_problems_are_what_a_started_job_and_a_planned_point_report() -> None:
    """The same rule, in the words of a started job (choose_backend) and of a planned sweep
    point (its reason, without the field, says 'this point has')."""
    layout = Layout(0, 6, 0, 6, "127.0.0.1", 29500, "torchrun")
    with pytest.raises(
        UsageError,
        match=r"^field 'dist.tp': tp=4 needs a multiple of 4 "
        r"ranks; the launcher started 6$",
    ):
        choose_backend("fsdp", layout, 4, "gpt")
    planned = ParallelDims.of(6, 4).problems("fsdp", "gpt", planned=True)
    assert planned == [Problem("dist.tp", "tp=4 needs a multiple of 4 ranks; this point has 6")]
    assert planned[0].line("train.") == (
        "field 'train.dist.tp': tp=4 needs a multiple of 4 ranks; this point has 6"
    )


def test_pipeline_dimension_and_its_rules() -> None:
    """pp is the outermost mesh dimension; the pipeline's own rules (schedule, layers,
    micro-batches) come from pipeline_rules, the rank arithmetic from here."""
    pipe = Pipe("1f1b", 1, 4)
    dims = ParallelDims.of(8, 2, pp=2, pipe=pipe)
    assert (dims.dp, dims.tp, dims.pp, dims.fits) == (2, 2, 2, True)
    assert dims.names() == ("pp", "dp", "tp") and dims.shape() == (2, 2, 2)
    assert [dims.coords(r) for r in (0, 3, 5)] == [
        {"pp": 0, "dp": 0, "tp": 0},
        {"pp": 0, "dp": 1, "tp": 1},
        {"pp": 1, "dp": 0, "tp": 1},
    ]
    assert dims.problems("ddp", "gpt", {"n_layers": 4}) == []
    assert dims.describe_pipe() == "pp 2, 1f1b, m 4"
    assert dims.problems("ddp", "gpt", {"size": "tiny"}) == []  # 2 layers, 2 stages
    assert [str(p) for p in dims.problems("ddp", "gpt", {"n_layers": 3})] == [
        "field 'dist.pp': the model's 3 layers do not split over pp x v = 2 x 1 = 2 stages"
    ]
    small = ParallelDims.of(8, 2, pp=2, pipe=Pipe("1f1b", 1, 1))
    assert [str(p) for p in small.problems("ddp", "gpt")] == [
        "field 'dist.microbatches': schedule 1f1b needs m >= pp = 2 micro-batches, not 1"
    ]
    odd = ParallelDims.of(6, 2, pp=2, pipe=pipe)
    assert [str(p) for p in odd.problems("ddp", "gpt", planned=True)] == [
        "field 'dist.pp': tp x pp = 2 x 2 needs a multiple of 4 ranks; this point has 6"
    ]
    assert ParallelDims.of(8, 2).names() == ("dp", "tp")


def test_dims_from_the_run_config() -> None:
    from scalelab.backends.config import DistConfig

    dist = DistConfig(tp=2, pp=2, schedule="interleaved-1f1b", virtual_stages=2)
    dims = ParallelDims.from_dist(8, dist)
    assert (dims.dp, dims.tp, dims.pp) == (2, 2, 2)
    assert dims.pipe == Pipe("interleaved-1f1b", 2, 2, False)  # m defaults to pp
    assert ParallelDims.from_dist(4, DistConfig()).pipe.m == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_dims_refuse_non_positive_sizes(bad) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        ParallelDims(8, bad)


# ----------------------------------------------------------------------------- batch rule


def _cfg(global_batch: int, accum: int = 1) -> RunConfig:
    return from_dict({"optim": {"global_batch_size": global_batch, "grad_accum_steps": accum}})


def test_batch_message_names_the_real_world_size_with_tp() -> None:
    """8 ranks with tp 2 are 4 data-parallel replicas: the message says so and names 8."""
    with pytest.raises(UsageError) as err:
        resolve_batch(_cfg(6), ParallelDims.of(8, 2))
    msg = str(err.value)
    assert "world size 8" in msg and "world_size = 4" not in msg, msg
    assert msg == (
        "field 'optim.global_batch_size': 6 is not divisible by data-parallel "
        "ranks (world size 8 / tp 2) * grad_accum_steps = 4 * 1"
    )
    plan = resolve_batch(_cfg(8), ParallelDims.of(8, 2))
    assert (plan.global_batch, plan.per_rank_batch) == (8, 2)


def test_batch_message_without_tp_keeps_its_words() -> None:
    with pytest.raises(
        UsageError,
        match=r"is not divisible by world_size \* grad_accum_steps "
        r"= 3 \* 2$",
    ):
        resolve_batch(_cfg(8, accum=2), 3)
    assert resolve_batch(_cfg(12, accum=2), ParallelDims.of(3)).micro_batch == 2


# ----------------------------------------------------------------------------- registry


def test_registry_builds_every_backend_and_knows_its_classes() -> None:
    for name in BACKENDS:
        for tp in (1, 2):
            cls = load_class(name, tp)
            assert name_of(cls) == name
    assert load_class("ddp", 2).__module__ == "scalelab.backends.tp"
    assert load_class("ddp", 1).__module__ == "scalelab.backends.ddp"
    with pytest.raises(
        UsageError,
        match=r"^field 'dist.backend': unknown backend 'mpi'; "
        r"valid: auto, ddp, horovod, none, fsdp$",
    ):
        load_class("mpi")
    assert (AUTO, *BACKENDS) == CHOICES and set(BACKENDS) == set(REGISTRY)


def _workflow_backends(path: Path) -> list[str]:
    schema = yaml.safe_load(path.read_text())
    return schema["$defs"]["SweepSection"]["properties"]["backends"]["items"]["enum"]


def test_schemas_list_exactly_the_registry() -> None:
    """The provenance schema, the workflow schema (package and workflow copy), the run
    config's schema (generated and committed) and its pydantic choices: all the registry."""
    prov = json.loads((SRC / "schemas" / "provenance.schema.json").read_text())
    found = [
        n["backend"]["enum"]
        for n in _walk(prov)
        if isinstance(n, dict) and isinstance(n.get("backend"), dict) and "enum" in n["backend"]
    ]
    assert found == [list(CHOICES)]
    assert _workflow_backends(REPO / "workflow" / "schemas" / "config.schema.yaml") == list(
        BACKENDS
    )
    run_schema = json.loads((REPO / "workflow" / "schemas" / "run.schema.json").read_text())
    assert run_schema["$defs"]["DistConfig"]["properties"]["backend"]["enum"] == list(CHOICES)
    generated = RunConfig.model_json_schema()["$defs"]["DistConfig"]["properties"]["backend"]
    assert generated["enum"] == list(CHOICES)


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


#: Modules where a backend name's spelling means something else, and what. Everything
#: else asks the registry (scalelab.backends.registry) for a name, role or capability.
NOT_A_BACKEND = {
    "analysis/plots.py": {"none": "matplotlib's fillstyle"},
    "backends/__init__.py": {"horovod": "the horovod package (library_versions)"},
    "backends/config.py": {"none": "dist.horovod.compression: no compression"},
    "backends/horovod.py": {"none": "dist.horovod.compression: no compression"},
    "bundle.py": {"none": "a printed 'none' (no images)"},
    "comm/cli.py": {"horovod": "commbench's --lib: the horovod library"},
    "comm/libs.py": {"horovod": "commbench's libraries: the horovod package"},
    "comm/predict.py": {"fsdp": "the dist.fsdp options section of a stored config"},
    "container/build.py": {"horovod": "the image's horovod package", "none": "pip --abi none"},
    "container/build_gpu_plan.py": {"horovod": "the image's horovod package version"},
    "container/cli_build.py": {"horovod": "the horovod stage's cache directory"},
    "container/cli_recipe.py": {"horovod": "the image's horovod version option"},
    "container/lint.py": {"horovod": "the horovod version label", "none": "an absent label"},
    "container/selftest.py": {"horovod": "the image's horovod package"},
    "doctor.py": {"horovod": "the horovod package probe"},
    "launch/commands.py": {"none": "mpirun --bind-to none, srun --mpi=none"},
    "sysfacts.py": {"horovod": "the horovod package version"},
    "container/build_gpu.py": {"horovod": "the image's horovod package", "none": "pip --abi none"},
    "study/config.py": {"horovod": "commbench's libs: the horovod library"},
}
REGISTRY_MODULE = "backends/registry.py"


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            docstrings.add(id(body[0].value))
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_backend_names_are_spelled_only_in_the_registry() -> None:
    """A string constant equal to a backend name (outside docstrings) exists only in the
    registry module, or where the listed module means something else by it; and every
    listed exception is still needed (the list cannot go stale)."""
    names = set(BACKENDS)
    seen: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            if node.value in names:
                seen.setdefault(rel, set()).add(node.value)
    assert seen.pop(REGISTRY_MODULE) == names
    stray = {rel: sorted(v - set(NOT_A_BACKEND.get(rel, {}))) for rel, v in seen.items()}
    assert {rel: v for rel, v in stray.items() if v} == {}, (
        "spell backend names through scalelab.backends.registry"
    )
    stale = {rel: sorted(set(v) - seen.get(rel, set())) for rel, v in NOT_A_BACKEND.items()}
    assert {rel: v for rel, v in stale.items() if v} == {}


def test_the_ast_check_sees_a_backend_name() -> None:
    """The walk above finds a name in code and ignores it in a docstring."""
    tree = ast.parse('"""ddp in a docstring"""\nx = "fsdp"\n')
    assert [n.value for n in _string_constants(tree)] == ["fsdp"]


# ----------------------------------------------------------------------------- the mesh

MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from scalelab.backends import ParallelDims
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dims = ParallelDims.of(dist.get_world_size(), int(sys.argv[2]))
    mesh = dims.build_mesh("cpu")
    out = {"names": list(mesh.mesh_dim_names), "shape": list(mesh.shape),
           "dp_ranks": dist.get_process_group_ranks(mesh["dp"].get_group()),
           "tp_ranks": dist.get_process_group_ranks(mesh["tp"].get_group()),
           "dp_rank": dims.dp_rank(rank), "mesh_dp": mesh["dp"].get_local_rank()}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("tp", [1, 2])
def test_build_mesh_on_two_gloo_ranks(tmp_path: Path, tp: int) -> None:
    """2 ranks: tp 1 is a (2, 1) mesh whose dp group is both ranks; tp 2 is (1, 2) whose
    tp group is both ranks; the dims' dp rank is the mesh's."""
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29630 + tp),
            str(script),
            str(tmp_path),
            str(tp),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, g in enumerate(got):
        assert g["names"] == ["dp", "tp"] and g["shape"] == [2 // tp, tp]
        assert g["dp_rank"] == g["mesh_dp"] == (r if tp == 1 else 0)
        assert g["dp_ranks"] == ([0, 1] if tp == 1 else [r])
        assert g["tp_ranks"] == ([r] if tp == 1 else [0, 1])


def test_recomputation_without_a_pipeline_needs_a_sharded_backend() -> None:
    """dist.activation_checkpointing at pp=1 is applied by fsdp only; elsewhere it would
    be a knob that does nothing, so it is refused in one line."""
    recompute = Pipe(recompute=True)
    assert ParallelDims.of(2, pipe=recompute).problems("fsdp", "gpt") == []
    assert ParallelDims.of(2, pp=2, pipe=Pipe(m=2, recompute=True)).problems("ddp", "gpt") == []
    (line,) = [str(p) for p in ParallelDims.of(2, pipe=recompute).problems("ddp", "gpt")]
    assert line.startswith("field 'dist.activation_checkpointing': recomputation runs in")
    assert "backend ddp at pp=1" in line
