"""The run configuration: one pydantic v2 definition, loaded from YAML and strictly validated.

This module is the single description of a training run. Each field's attribute
docstring is its documentation: ``scalelab train --explain`` prints it, the JSON
schema (:func:`json_schema`, also embedded in the workflow schema) carries it as
``description``, and validation uses the same types and bounds, so the three
cannot drift apart.

Errors are one line naming the field path, e.g. ``field 'optim.lr': must be a
finite number > 0, got nan``, raised as :class:`~scalelab.errors.UsageError`
(exit 2). Unknown keys get a "did you mean". Checks that need the world size
(batch divisibility) live in :func:`resolve_batch`; the workflow calls it for
every sweep point at plan time, the trainer again at start.

Extension points: backends own their options (``dist``: :mod:`scalelab.backends.config`),
so a new backend adds its section there; the world-size arithmetic takes the
job's :class:`~scalelab.backends.parallel_dims.ParallelDims` (the batch splits over its
data-parallel replicas).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from scalelab import docload
from scalelab.backends.config import DistConfig, FSDPConfig, HorovodConfig
from scalelab.config_types import (
    Finite,
    LearningRate,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Section,
    Seed,
    SplitName,
    did_you_mean,
    show,
)
from scalelab.config_types import format_error as _format_error
from scalelab.data.kinds import GENERATED_RUN_SOURCES, RUN_SOURCES, RUN_SYNTHETIC, TOKENS
from scalelab.errors import UsageError
from scalelab.models import _REGISTRY, model_names

__all__ = [
    "DistConfig",
    "FSDPConfig",
    "Finite",
    "HorovodConfig",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "RunConfig",
    "Section",
    "SplitName",
]

#: Models that train on token sequences (data.source tokens); every other model trains on
#: images.
TOKEN_MODELS = ("gpt",)

#: Values in one sample (C x H x W): 16 Mi floats are 64 MB per image.
MAX_SAMPLE_VALUES = 2**24


class ModelConfig(Section):
    """What network to train."""

    name: str = "cnn"
    """Registry name (scalelab.models): cnn, gpt, resnet, resnet18, resnet50 or vit."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the model builder, e.g. ``{depth: 50, width: 64}`` for resnet."""
    sync_batchnorm: bool = False
    """Synchronize batch-norm statistics over all ranks (ddp and horovod, CUDA only)."""

    @model_validator(mode="after")
    def _known_model(self) -> ModelConfig:

        if self.name not in model_names():
            hint = _did_you_mean(self.name, model_names())
            raise ValueError(
                f"@name:unknown model {self.name!r}{hint}; valid: {', '.join(model_names())}"
            )
        return self


class DataConfig(Section):
    """Where samples come from."""

    source: Literal[*RUN_SOURCES] = RUN_SYNTHETIC
    """synthetic: seeded on-the-fly images; memory-npz: one .npz loaded into memory;
    staged: sharded data written by ``scalelab data stage``; tokens: seeded learnable token
    sequences for language models (model gpt)."""
    path: str | None = None
    """The .npz file (memory-npz) or staged data directory (staged); unused for synthetic."""
    train_split: SplitName = "train"
    """Split to train on."""
    val_split: SplitName | None = "val"
    """Split to validate on after each epoch; null: no validation."""
    num_samples: PosInt = 4096
    """synthetic only: training samples per epoch."""
    val_samples: PosInt = 512
    """synthetic only: validation samples."""
    num_classes: PosInt = 10
    """synthetic only: number of classes (file-backed sources carry their own)."""
    image_shape: Annotated[
        list[Annotated[int, Field(ge=1, le=65536)]], Field(min_length=3, max_length=3)
    ] = Field(default_factory=lambda: [3, 32, 32])
    """synthetic only: image shape [C, H, W]; at most 2**24 values per image."""
    signal: NonNegFloat = 0.5
    """synthetic only: strength of the class pattern against unit noise (0: unlearnable)."""
    seq_len: PosInt = 64
    """tokens only: tokens per sample (the model's context length)."""
    vocab_size: Annotated[int, Field(ge=5, le=10**7)] = 256
    """tokens only: vocabulary size (num_samples and val_samples count sequences)."""
    prefetch: bool | None = None
    """Load the next batch in a background thread; null: on with CUDA, off on CPU."""
    localize: bool = False
    """staged only: copy the shards to node-local scratch once per node at start (verified),
    and read them there; falls back to the shared copy with a warning when scratch is small."""
    scratch: str | None = None
    """Node-local scratch directory for ``localize``; null: $SCALELAB_SCRATCH, $SLURM_TMPDIR,
    $TMPDIR, then /tmp."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source not in GENERATED_RUN_SOURCES and not self.path:
            raise ValueError(f"@path:required for data.source {self.source!r}")
        if math.prod(self.image_shape) > MAX_SAMPLE_VALUES:
            raise ValueError(
                f"@image_shape:{self.image_shape} is {math.prod(self.image_shape)}"
                f" values per image, more than {MAX_SAMPLE_VALUES}"
            )
        return self


class OptimConfig(Section):
    """Optimizer, batch size and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer."""
    lr: LearningRate = 0.1
    """Learning rate at ``base_batch_size`` (or as is, when base_batch_size is null);
    a finite number, 0 < lr <= 10."""
    base_batch_size: PosInt | None = None
    """Linear scaling rule: effective lr = lr * global_batch_size / base_batch_size;
    null: no scaling."""
    global_batch_size: PosInt | None = None
    """Samples per optimizer step over all ranks; must divide by world_size * grad_accum_steps.
    Give this or per_rank_batch_size (neither: 256 global)."""
    per_rank_batch_size: PosInt | None = None
    """Samples per optimizer step on each rank (global = this * world size); must divide by
    grad_accum_steps."""
    grad_accum_steps: PosInt = 1
    """Micro-batches accumulated per optimizer step (gradients are averaged once per step)."""
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9
    """SGD momentum, in [0, 1)."""
    nesterov: bool = False
    """SGD Nesterov momentum (needs momentum > 0)."""
    weight_decay: NonNegFloat = 0.0
    """L2 weight decay (decoupled for adamw)."""
    warmup_epochs: NonNegFloat = 0.0
    """Linear warm-up from lr/warmup_steps to the effective lr over this many epochs."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate decay after warm-up."""
    milestones: list[NonNegFloat] = Field(default_factory=list)
    """schedule=step: epochs at which lr is multiplied by gamma (increasing)."""
    gamma: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    """schedule=step: decay factor, in (0, 1]."""
    grad_clip: PosFloat | None = None
    """Clip the global gradient norm to this value after averaging; null: no clipping."""

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.global_batch_size is not None and self.per_rank_batch_size is not None:
            raise ValueError(
                "@per_rank_batch_size:give either optim.global_batch_size or "
                "optim.per_rank_batch_size, not both"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("@nesterov:Nesterov momentum needs optim.momentum > 0")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"@milestones:must increase, got {self.milestones}")
        return self


class TrainConfig(Section):
    """Length of training and execution options."""

    epochs: PosInt = 1
    """Passes over the training split."""
    steps_per_epoch: PosInt | None = None
    """Cap on optimizer steps per epoch (throughput runs); null: the whole split."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms, no cuDNN autotuning: bitwise repeatable runs."""
    compile: bool = False
    """Compile the model with torch.compile."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast; auto: bf16 on CUDA devices that support it, fp32 elsewhere."""
    channels_last: bool | None = None
    """NHWC memory format for 4-D tensors; null: on with CUDA, off on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the local rank's GPU when CUDA is available, else CPU."""
    threads: PosInt | None = None
    """torch intra-op threads per rank on CPU; null: OMP_NUM_THREADS, else cores / ranks
    on the node."""
    progress: bool | None = None
    """Progress bar on rank 0 (other ranks are always quiet); null: only when stderr is a
    terminal."""
    val_every_epochs: PosInt = 1
    """Validate every N epochs (and always after the last)."""


class CheckpointConfig(Section):
    """When checkpoints are written (by rank 0, atomically, to RUN_DIR/checkpoints)."""

    every_epochs: NonNegInt = 1
    """Checkpoint at the end of every N epochs; 0: never (the final one is still written)."""
    every_steps: NonNegInt = 0
    """Also checkpoint every N optimizer steps; 0: never."""
    keep: PosInt = 2
    """Number of newest checkpoints kept."""


class MetricsConfig(Section):
    """What goes into RUN_DIR/metrics.jsonl."""

    log_every: PosInt = 1
    """Write a step record (and check for stop signals) every N optimizer steps."""
    warmup_steps: NonNegInt = 3
    """Steps at the start excluded from throughput (the first epoch is excluded
    altogether from the run's samples/s when there are several epochs)."""
    energy: bool = True
    """Energy per sample from the hardware's cumulative counters, read at epoch
    boundaries: NVML on NVIDIA GPUs, RAPL (CPU packages and DRAM) on the node's local
    rank 0 where readable. The summary gives what could be read and why the rest could
    not; false reads nothing. Counters see the whole node: meaningful on exclusive nodes."""


class RunConfig(Section):
    """One training run."""

    seed: Seed = 0
    """Seed of model initialization and data order (0 to 2**32 - 1)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimization."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    dist: DistConfig = Field(default_factory=DistConfig)
    """Distribution."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Metrics."""

    @model_validator(mode="after")
    def _model_fits_data(self) -> RunConfig:
        """gpt on images (or an image model on tokens) fails in the job: refuse it here."""
        tokens = self.data.source == TOKENS
        if (self.model.name in TOKEN_MODELS) != tokens:
            kind, given = ("images", "token sequences") if tokens else ("token sequences", "images")
            want = f"model {TOKEN_MODELS[0]}" if tokens else "data.source tokens"
            raise ValueError(
                f"@model.name:model {self.model.name!r} trains on {kind}, but "
                f"data.source {self.data.source!r} gives {given} (use {want})"
            )
        return self


# --------------------------------------------------------------------------- errors
# One formatter for every config (scalelab.config_types): field path, "did you mean".
_did_you_mean = did_you_mean
_show = show


def format_error(exc: ValidationError, prefix: str = "") -> str:
    """The first error of ``exc`` as ``field 'PREFIXpath': reason`` (one line)."""
    return _format_error(exc, RunConfig, prefix)


# --------------------------------------------------------------------------- loading


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UsageError(f"field '{dotted}': {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (value parsed as YAML) to a config tree."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected key.path=value")
        value = docload.loads(raw, f"--set {key.strip()}", mapping=False) if raw.strip() else None
        _set_path(tree, key.strip(), value)
    return tree


def from_dict(data: dict[str, Any] | None, prefix: str = "") -> RunConfig:
    """Validate a nested dict into a RunConfig (strict: unknown keys and wrong types fail).

    ``prefix`` is prepended to field paths in errors (the workflow passes ``train.``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(
            f"field '{prefix.rstrip('.') or 'config'}': expected a mapping, got {_show(data)}"
        )
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(format_error(exc, prefix)) from None
    validate(cfg, prefix)
    return cfg


def load(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (``None``: all defaults) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = docload.load(path, f"--config {path}")
    return from_dict(apply_overrides(tree, overrides or []))


def validate(cfg: RunConfig, prefix: str = "") -> None:
    """Checks beyond types and bounds that need no world size and no torch import."""
    if cfg.dist.elastic is not None and cfg.optim.per_rank_batch_size is not None:
        raise UsageError(
            f"field '{prefix}dist.elastic': needs optim.global_batch_size, not "
            "optim.per_rank_batch_size (weak scaling would change the global batch, and the "
            "loss curve, with every membership change)"
        )
    allowed = model_option_names(cfg.model.name)
    for key in cfg.model.options:
        if key not in allowed:
            raise UsageError(
                f"field '{prefix}model.options.{key}': not an option of model "
                f"{cfg.model.name!r}{_did_you_mean(key, allowed)}; "
                f"valid: {', '.join(allowed) or '(none)'}"
            )


@cache
def model_option_names(name: str) -> list[str]:
    """Keyword options of model ``name``'s builder, read from its source (no torch import):
    cheap enough for the workflow's plan-time check of every sweep point."""
    import ast
    import importlib.util

    module, func = _REGISTRY[name].split(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            args = [*node.args.args, *node.args.kwonlyargs]
            return [a.arg for a in args if a.arg not in ("num_classes", "image_shape")]
    raise LookupError(f"model builder {module}:{func} not found")  # a bug in the registry


# --------------------------------------------------------------------------- documentation


def field_docs(cls: type[Section]) -> dict[str, str]:
    """Field name -> its attribute docstring (what --explain and the JSON schema show)."""
    return {name: " ".join((f.description or "").split()) for name, f in cls.model_fields.items()}


def sections(cls: type[Section] = RunConfig) -> list[type[Section]]:
    """Every section model reachable from ``cls`` (``cls`` first)."""
    found = [cls]
    for f in cls.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            found += sections(f.annotation)
    return found


def explain(cls: type[Section] = RunConfig, prefix: str = "") -> list[str]:
    """Lines ``path: default  # doc`` for every field, recursively."""
    lines = []
    docs = field_docs(cls)
    default = cls()
    for name, f in cls.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            lines.append(f"{path}:  # {docs.get(name, '')}")
            lines.extend(explain(f.annotation, path + "."))
        else:
            value = yaml.safe_dump(getattr(default, name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{path}: {value}  # {docs.get(name, '')}")
    return lines


def json_schema() -> dict[str, Any]:
    """The run config's JSON schema (draft 2020-12), generated from the models above."""
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
