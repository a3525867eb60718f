"""The study config: one pydantic definition of the whole workflow configuration.

:class:`StudyConfig` holds every section of config/config.yaml with its types, bounds
(the hostile-input limits of :mod:`scalelab.config_types` and of docs/reliability.md),
defaults and documentation. ``train`` is the run config (:class:`RunConfig`, validated as
written and again per sweep point), ``container`` is :class:`ContainerConfig`. The
workflow schema (workflow/schemas/config.schema.yaml) is generated from these models
(:func:`write_schemas`, ``scalelab plan --write-schema``); a test holds the committed file
to it.

:func:`validate` is what the workflow's common.smk calls when Snakemake builds the DAG,
before anything is staged, logged or submitted: numbers finite, then the models, then
what a model cannot express (:mod:`scalelab.study.checks`), then the plan
(:mod:`scalelab.study.plan`) and every point's resolved run config. Every error is one
line naming the field path (and the sweep point where it depends on one), e.g.
``config: sweep point ddp-strong-n3-t1-g0-r0: field 'train.optim.global_batch_size': 32
is not divisible by world_size * grad_accum_steps = 3 * 1``. The checks are cheap (no
dataset walks, no torch import): Snakemake re-parses the workflow inside every job.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError

from scalelab import docload
from scalelab.backends.config import ScheduleName
from scalelab.backends.registry import BACKENDS
from scalelab.config_types import Section, first_error
from scalelab.container.config import ContainerConfig
from scalelab.data import kinds
from scalelab.errors import UsageError
from scalelab.study.checks import (
    OPTIONAL_KNOBS,
    _check_finite,
    _check_semantics,
    _check_strings,
    _path,
)
from scalelab.study.files import YTE_HINT_PLAN
from scalelab.study.plan import _check_size, check_points, plan
from scalelab.tracking.config import TrackingConfig
from scalelab.train.config import json_schema as run_schema


def _unique(items: list) -> list:
    if len({json.dumps(i) for i in items}) != len(items):
        raise ValueError(f"has duplicate items: {items}")
    return items


def _int(lo: int, hi: int | None = None) -> Any:
    return Annotated[int, Field(ge=lo, le=hi)] if hi is not None else Annotated[int, Field(ge=lo)]


def _axis(item: Any) -> Any:
    """A list of distinct values, at least one (a sweep axis)."""
    return Annotated[
        list[item],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_unique),
    ]


Name = Annotated[str, Field(min_length=1)]


class DataSection(Section):
    """What ``scalelab stage`` stages (see ``scalelab stage --help``)."""

    source: Literal[kinds.STUDY_SOURCES]
    """Where samples come from; tokens: seeded synthetic token sequences for gpt, which
    every rank generates (sized in train.data: num_samples, val_samples, seq_len,
    vocab_size): nothing is staged, and the test split is generated too."""
    path: str | None = None
    """Source directory (imagefolder) or file (npz)."""
    seed: _int(0, 4294967295) = 0
    """Seed of the train/val/test split and of synthetic data."""
    split: Annotated[
        list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]],
        Field(min_length=3, max_length=3),
    ] = Field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train, validation and test fractions (sum 1)."""
    shards: _int(1, 100000) = 4
    """Shards per split."""
    image_size: _int(1, 4096) | None = None
    """Resize imagefolder images to this square size."""
    num_samples: _int(1, 100000000) | None = None
    """synthetic source only: number of images."""
    num_classes: _int(2, 1000000) | None = None
    """synthetic source only: number of classes."""
    node_local: bool = False
    """Copy shards to node-local scratch at the start of each training job."""
    scratch: str | None = None
    """Node-local scratch directory (default $SLURM_TMPDIR, then $TMPDIR)."""


class SweepSection(Section):
    """The parallel configurations; every combination becomes one training job."""

    backends: _axis(Literal[BACKENDS])
    """Data-parallel backends to compare (fsdp shards parameters, gradients and optimizer
    state)."""
    nodes: _axis(_int(1, 1000000))
    """Node counts."""
    tasks_per_node: _axis(_int(1, 1024))
    """Ranks per node."""
    gpus_per_task: _axis(_int(0, 64)) = Field(default_factory=lambda: [0])
    """GPUs per rank (0 = CPU run)."""
    tp: _axis(_int(1, 4096)) | None = None
    """Tensor-parallel ranks per model replica (gpt with ddp or fsdp, on a dp x tp mesh;
    absent: train.dist.tp as written, else 1). Combinations that cannot exist (horovod or
    none with tp > 1, tp not dividing the ranks, a model without a tensor-parallel plan)
    are skipped and listed by ``scalelab plan``, when the workflow starts and in
    RESULTS/sweep.json; run ids of tp = 1 carry no tp."""
    pp: _axis(_int(1, 4096)) | None = None
    """Pipeline stages per model replica (gpt with ddp or fsdp, on a pp x dp x tp mesh;
    absent: train.dist.pp as written, else 1). Combinations that cannot exist (horovod or
    none with pp > 1, a model that does not split into stages, layers not divisible by pp
    x train.dist.virtual_stages, m below pp for 1f1b, a replica's batch that m
    micro-batches do not split) are skipped and listed like those of ``tp``; run ids of
    pp = 1 carry no pp."""
    microbatches: _axis(_int(1, 65536)) | None = None
    """Micro-batches per pipeline step (m) of the points with pp > 1 (absent:
    train.dist.microbatches as written, else pp); the bubble is (pp - 1) / (v m). Points
    without a pipeline run once, whatever this list holds; run ids of pp > 1 carry m when
    it is given."""
    schedule: _axis(ScheduleName) | None = None
    """Pipeline schedules of the points with pp > 1 (absent: train.dist.schedule as
    written, else 1f1b); run ids of pp > 1 carry the schedule when it is given."""
    modes: _axis(Literal["strong", "weak"]) = Field(default_factory=lambda: ["strong"])
    """strong: the global batch is fixed, more ranks split it; weak: the batch per rank is
    fixed (that of the smallest configuration), the global batch grows."""
    repeats: _int(1) = 1
    """Times each configuration is trained (timings are aggregated)."""
    max_points: _int(1, 100000) = 1000
    """Upper bound on the number of training jobs (the product of the lists above and
    repeats), checked before the sweep is expanded."""


class ClusterSection(Section):
    """What one node offers; used to reject sweeps that cannot fit."""

    cpus_per_node: _int(1, 65536) | None = None
    """CPU cores per node (null = do not check)."""
    gpus_per_node: _int(0, 64) = 0
    """GPUs per node."""
    nodes: _int(1, 1000000) | None = None
    """Nodes the cluster (or partition) has; sweep.nodes may not exceed it (null = do not
    check)."""


class LaunchSection(Section):
    """How ranks are started (with or without a container: the srun side of a job)."""

    local: Literal["mpirun", "torchrun"] = "mpirun"
    """Launcher outside a Slurm allocation."""
    srun_mpi: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] = "pmix"
    """Value of srun --mpi inside a Slurm allocation (pmi2 or cray_shasta for MPICH)."""
    cpus_per_task: _int(1, 4096) = 1
    """Cores (and torch threads) per rank."""
    timeout_s: _int(10, 604800) = 300
    """Collective timeout; a dead peer fails the job after this long."""
    extra_srun_args: list[str] = Field(default_factory=list)
    """Further srun arguments, each one list item (e.g. --cpu-bind=cores)."""
    socket_ifname: str | None = None
    """Network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME)."""


class RuleResources(Section):
    """Per-rule overrides of the resources keys."""

    slurm_partition: Name | None = None
    slurm_account: Name | None = None
    constraint: Name | None = None
    qos: Name | None = None
    slurm_extra: list[str] | None = None
    runtime: _int(1) | None = None
    mem_mb_per_cpu: _int(1) | None = None
    retries: _int(0, 10) | None = None


RuleName = Literal["stage", "train", "evaluate", "commbench", "analyze", "predict"]


class ResourcesSection(Section):
    """Slurm site settings and limits. The site keys (partition, account, constraint, qos,
    slurm_extra) reach every rule that runs on Slurm; ``rules:`` overrides any key for one
    rule. runtime and mem_mb_per_cpu are those of the training jobs; the other rules take
    small_runtime and small_mem_mb_per_cpu unless overridden."""

    mem_mb_per_cpu: _int(1, 16777216) = 2000
    """Memory per CPU in MB of a training job."""
    runtime: _int(1, 525600) = 60
    """Wall-time limit of one training job in minutes."""
    small_mem_mb_per_cpu: _int(1, 16777216) = 2000
    """Memory per CPU in MB of the other rules (stage, evaluate, commbench, analyze,
    predict)."""
    small_runtime: _int(1, 525600) = 30
    """Wall-time limit in minutes of the other rules."""
    slurm_partition: Name | None = None
    """sbatch --partition of every Slurm job (null = the cluster's default)."""
    slurm_account: Name | None = None
    """sbatch --account of every Slurm job (null = none, or the profile's)."""
    constraint: Name | None = None
    """sbatch --constraint of every Slurm job (node features, e.g. a100)."""
    qos: Name | None = None
    """sbatch --qos of every Slurm job."""
    slurm_extra: list[str] = Field(default_factory=list)
    """Further sbatch options, one ``--option=value`` list item each (e.g.
    --reservation=course); options the workflow sets itself are refused."""
    retries: _int(0, 10) = 1
    """Times a failed training or commbench job is resubmitted (preemption, node failure;
    training resumes from its newest checkpoint). Other rules are deterministic and never
    retry; a config error never reaches a job."""
    rules: dict[RuleName, RuleResources] = Field(default_factory=dict)
    """Per-rule overrides of the keys above, e.g. ``rules: {stage: {runtime: 120}}``."""


class AnalysisSection(Section):
    """The scaling analysis and the prediction."""

    threshold: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.7
    """The sweet spot is the largest scale whose parallel efficiency stays above this."""
    target_accuracy: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    """Validation accuracy for the time-to-target column (null = none)."""
    from_csv: list[str] = Field(default_factory=list)
    """CSV files of external measurements (e.g. a published table) to put beside the runs."""
    predict_nodes: _int(1, 1000000) = 64
    """scalelab predict extrapolates up to this many nodes."""
    predict_ranks_per_node: _int(1, 1024) = 4
    """Ranks (GPUs) per node of the prediction."""


class CommbenchSection(Section):
    """The collective benchmark (allreduce, allgather, broadcast) on the sweep's largest
    layout."""

    enabled: bool = True
    """Run it."""
    libs: Annotated[
        list[Literal["torch", "horovod", "mpi4py"]],
        Field(json_schema_extra={"uniqueItems": True}),
        AfterValidator(_unique),
    ] = Field(default_factory=lambda: ["torch", "horovod", "mpi4py"])
    """Communication libraries to measure."""
    max_bytes: Annotated[str, Field(pattern=r"^[0-9]+[KMG]?$")] = "256M"
    """Largest message (from 1K)."""
    iters: _int(1, 100000) = 20
    """Timed calls per message size."""


class StudyConfig(Section):
    """The configuration of one scaling study: the data to stage, the base training run,
    the sweep of parallel configurations to train it with, how ranks are launched,
    per-rule resources, and the analysis. Unknown keys are errors."""

    results: Name = "results"
    """Directory that receives every output of the workflow."""
    data: DataSection
    """Data."""
    train: dict[str, Any]
    """The base run configuration given to ``scalelab train``: see ``scalelab train
    --explain``. Every sweep point's resolved run config is validated when the DAG is
    built. The workflow sets data.source/path/localize/scratch, dist.backend/timeout_s/
    socket_ifname and train.threads itself."""
    sweep: SweepSection
    """Sweep."""
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    """Cluster."""
    launch: LaunchSection = Field(default_factory=LaunchSection)
    """Launch."""
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    """Resources."""
    analysis: AnalysisSection = Field(default_factory=AnalysisSection)
    """Analysis."""
    commbench: CommbenchSection = Field(default_factory=CommbenchSection)
    """Commbench."""
    container: ContainerConfig = Field(default_factory=ContainerConfig)
    """Container."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment trackers (MLflow, TensorBoard) fed from every run; see docs/tracking.md."""

    def to_config(self) -> dict[str, Any]:
        """The plain dict the workflow reads (``config[...]``): every default filled in,
        the optional knobs (``sweep.tp``, ``pp``, ...) absent when not given, per-rule
        overrides only where set."""
        out = self.model_dump(mode="python")
        for knob in OPTIONAL_KNOBS:
            if out["sweep"][knob] is None:
                del out["sweep"][knob]
        out["resources"]["rules"] = {
            rule: {k: v for k, v in section.items() if v is not None}
            for rule, section in out["resources"]["rules"].items()
        }
        return out


def _model_error(
    exc: ValidationError, root: type[Section], source: str, prefix: str = ""
) -> UsageError:
    path, reason = first_error(exc, root)
    return UsageError(
        f"{source}: {_path([prefix + path] if path else [])}: {reason}".replace("\n", " ")
    )


def validate(config: dict, source: str = "config") -> dict:
    """Return a validated copy of `config` with defaults filled in; UsageError otherwise.

    This is the one entry point the workflow uses (common.smk) and the tests exercise.
    """
    if not isinstance(config, dict):
        raise UsageError(f"{source}: the configuration must be a mapping")
    cfg = copy.deepcopy(config)
    _check_finite(cfg, [], source)
    try:
        cfg = StudyConfig.model_validate(cfg).to_config()
    except ValidationError as exc:
        raise _model_error(exc, StudyConfig, source) from None
    _check_strings(cfg, source)
    _check_semantics(cfg, source)
    _check_size(cfg, source)
    try:
        plan(cfg)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None
    check_points(cfg, source)
    return cfg


def validate_launch(launch: dict) -> dict:
    """A `launch` section on its own, checked and completed like the workflow's."""
    try:
        return LaunchSection.model_validate(launch).to_dict()
    except ValidationError as exc:
        path, reason = first_error(exc, LaunchSection)
        raise UsageError(f"launch.{path}: {reason}") from None


def load(path: str | Path, allow_yte: bool = False) -> dict:
    """Read a workflow config through the one document loader and validate it.

    ``__use_yte__`` is refused unless ``allow_yte`` (the user trusts the config's code);
    then it is evaluated as Snakemake would, so the plan shows what Snakemake will run."""

    raw = docload.load(path)
    if docload.uses_yte(raw):
        if not allow_yte:
            docload.refuse_yte(raw, str(path), YTE_HINT_PLAN)
        import yte

        raw = yte.process_yaml(
            docload.decode(docload.read_bytes(path, str(path)), str(path)), require_use_yte=True
        )
    return validate(raw, source=str(path))


# --------------------------------------------------------------------------- schema


def json_schema() -> dict[str, Any]:
    """The workflow config's JSON schema (draft 2020-12), generated from
    :class:`StudyConfig`, with the run config's own schema as its ``train`` section."""

    out = StudyConfig.model_json_schema()
    run = run_schema()
    out["$defs"].update(run.pop("$defs"))
    run.pop("$schema", None)
    out["properties"]["train"] = {**run, "description": out["properties"]["train"]["description"]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **out}


SCHEMA_HEADER = (
    "# Generated from scalelab.study.config.StudyConfig by `scalelab plan "
    "--write-schema`:\n# edit the models, not this file (a test compares "
    "them).\n"
)


def schema_text() -> str:
    """workflow/schemas/config.schema.yaml as it must read."""
    return SCHEMA_HEADER + yaml.safe_dump(
        json_schema(), sort_keys=False, width=100, allow_unicode=True
    )


def write_schemas(root: Path) -> list[Path]:
    """Write the generated workflow schema and run-config schema into ROOT/workflow/schemas/
    (for editors, ``snakemake.utils.validate`` and a shared study); a test checks the
    committed copies are current."""

    folder = Path(root) / "workflow" / "schemas"
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such directory (run this in the study's directory)")
    out = folder / "run.schema.json"
    out.write_text(json.dumps(run_schema(), indent=2, sort_keys=True) + "\n")
    mirror = folder / "config.schema.yaml"
    mirror.unlink(missing_ok=True)  # never write through a link
    mirror.write_text(schema_text())
    return [out, mirror]
