"""The run configuration: dataclasses, loaded from YAML and strictly validated.

Every field has a docstring (``scalelab train --explain`` prints them). Errors
name the field path, e.g. ``field 'optim.global_batch_size': ...``, and are
raised as :class:`~scalelab.errors.UsageError` (one line, exit 2). Checks that
need the world size (batch divisibility) live in :func:`resolve_batch`, called
once the launcher is known.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scalelab.errors import UsageError


@dataclass
class ModelConfig:
    """What network to train."""

    name: str = "cnn"
    """Registry name: cnn, resnet, resnet18, resnet50 or vit."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the model builder, e.g. ``{depth: 50, width: 64}`` for resnet."""
    sync_batchnorm: bool = False
    """Synchronize batch-norm statistics over all ranks (ddp and horovod, CUDA only)."""


@dataclass
class DataConfig:
    """Where samples come from."""

    source: Literal["synthetic", "memory-npz", "staged"] = "synthetic"
    """synthetic: seeded on-the-fly images; memory-npz: one .npz loaded into memory;
    staged: sharded data written by ``scalelab stage``."""
    path: str | None = None
    """The .npz file (memory-npz) or staged data directory (staged); unused for synthetic."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str | None = "val"
    """Split to validate on after each epoch; null: no validation."""
    num_samples: int = 4096
    """synthetic only: training samples per epoch."""
    val_samples: int = 512
    """synthetic only: validation samples."""
    num_classes: int = 10
    """synthetic only: number of classes (file-backed sources carry their own)."""
    image_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    """synthetic only: image shape [C, H, W]."""
    signal: float = 0.5
    """synthetic only: strength of the class pattern against unit noise (0: unlearnable)."""
    prefetch: bool | None = None
    """Load the next batch in a background thread; null: on with CUDA, off on CPU."""
    localize: bool = False
    """staged only: copy the shards to node-local scratch once per node at start (verified),
    and read them there; falls back to the shared copy with a warning when scratch is small."""
    scratch: str | None = None
    """Node-local scratch directory for ``localize``; null: $SCALELAB_SCRATCH, $SLURM_TMPDIR,
    $TMPDIR, then /tmp."""


@dataclass
class OptimConfig:
    """Optimizer, batch size and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer."""
    lr: float = 0.1
    """Learning rate at ``base_batch_size`` (or as is, when base_batch_size is null)."""
    base_batch_size: int | None = None
    """Linear scaling rule: effective lr = lr * global_batch_size / base_batch_size;
    null: no scaling."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; must divide by world_size * grad_accum_steps.
    Give this or per_rank_batch_size (neither: 256 global)."""
    per_rank_batch_size: int | None = None
    """Samples per optimizer step on each rank (global = this * world size); must divide by
    grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (gradients are averaged once per step)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 0.0
    """L2 weight decay (decoupled for adamw)."""
    warmup_epochs: float = 0.0
    """Linear warm-up from lr/warmup_steps to the effective lr over this many epochs."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate decay after warm-up."""
    milestones: list[float] = field(default_factory=list)
    """schedule=step: epochs at which lr is multiplied by gamma."""
    gamma: float = 0.1
    """schedule=step: decay factor."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value after averaging; null: no clipping."""


@dataclass
class TrainConfig:
    """Length of training and execution options."""

    epochs: int = 1
    """Passes over the training split."""
    steps_per_epoch: int | None = None
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
    threads: int | None = None
    """torch intra-op threads per rank on CPU; null: OMP_NUM_THREADS, else cores / ranks
    on the node."""
    progress: bool | None = None
    """Progress bar on rank 0 (other ranks are always quiet); null: only when stderr is a
    terminal."""
    val_every_epochs: int = 1
    """Validate every N epochs (and always after the last)."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written (by rank 0, atomically, to RUN_DIR/checkpoints)."""

    every_epochs: int = 1
    """Checkpoint at the end of every N epochs; 0: never (the final one is still written)."""
    every_steps: int = 0
    """Also checkpoint every N optimizer steps; 0: never."""
    keep: int = 2
    """Number of newest checkpoints kept."""


@dataclass
class HorovodConfig:
    """Horovod-only knobs."""

    compression: Literal["none", "fp16", "bf16"] = "none"
    """Gradient compression in the allreduce."""
    fusion_threshold_mb: float | None = None
    """Tensor fusion buffer (HOROVOD_FUSION_THRESHOLD); null: Horovod's default (128 MB)."""


@dataclass
class DistConfig:
    """How ranks talk to each other."""

    backend: Literal["auto", "ddp", "horovod", "none"] = "auto"
    """auto: horovod under horovodrun, ddp for several ranks, none for one."""
    timeout_s: float = 300.0
    """A collective that waits longer than this fails the job (dead or stuck peer)."""
    socket_ifname: str | None = None
    """Network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME)."""
    bucket_cap_mb: float = 25.0
    """ddp: gradient bucket size."""
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    """Horovod options."""


@dataclass
class MetricsConfig:
    """What goes into RUN_DIR/metrics.jsonl."""

    log_every: int = 1
    """Write a step record (and check for stop signals) every N optimizer steps."""
    warmup_steps: int = 3
    """Steps at the start excluded from throughput (the first epoch is excluded
    altogether from the run's samples/s when there are several epochs)."""


@dataclass
class RunConfig:
    """One training run."""

    seed: int = 0
    """Seed of model initialization, data order and augmentation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimization."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distribution."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metrics."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON ready)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except UsageError:
                continue
        raise UsageError(f"field '{path}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UsageError(f"field '{path}': expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"field '{path}': expected a list, got {value!r}")
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"field '{path}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"field '{path}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"field '{path}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"field '{path}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"field '{path}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module


def _build(cls: type, data: Any, path: str) -> Any:
    where = f"field '{path}'" if path else "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            raise UsageError(f"field '{full}': unknown key; valid: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            full = f"{path}.{name}" if path else name
            kwargs[name] = _convert(data[name], hints[name], full)
    return cls(**kwargs)


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
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key}: value is not valid YAML: {exc}") from None
        _set_path(tree, key.strip(), value)
    return tree


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Validate a nested dict into a RunConfig (strict: unknown keys and wrong types fail)."""
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def load(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (``None``: all defaults) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(tree, dict):
            raise UsageError(f"--config {path}: expected a mapping at the top level")
    return from_dict(apply_overrides(tree, overrides or []))


def _positive(value: float | int | None, path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"field '{path}': must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Range checks that do not depend on the world size."""
    from scalelab.models import check_model_options

    check_model_options(cfg.model.name, cfg.model.options)
    d, o, t = cfg.data, cfg.optim, cfg.train
    if d.source != "synthetic" and not d.path:
        raise UsageError(f"field 'data.path': required for data.source {d.source!r}")
    if len(d.image_shape) != 3 or min(d.image_shape) < 1:
        raise UsageError(f"field 'data.image_shape': expected [C, H, W], got {d.image_shape}")
    _positive(d.num_samples, "data.num_samples")
    _positive(d.val_samples, "data.val_samples")
    _positive(d.num_classes, "data.num_classes")
    _positive(o.lr, "optim.lr")
    _positive(o.base_batch_size, "optim.base_batch_size")
    _positive(o.global_batch_size, "optim.global_batch_size")
    _positive(o.per_rank_batch_size, "optim.per_rank_batch_size")
    _positive(o.grad_accum_steps, "optim.grad_accum_steps")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(o.warmup_epochs, "optim.warmup_epochs", allow_zero=True)
    _positive(o.grad_clip, "optim.grad_clip")
    if o.global_batch_size is not None and o.per_rank_batch_size is not None:
        raise UsageError(
            "field 'optim.per_rank_batch_size': give either optim.global_batch_size or "
            "optim.per_rank_batch_size, not both"
        )
    _positive(t.epochs, "train.epochs")
    _positive(t.steps_per_epoch, "train.steps_per_epoch")
    _positive(t.threads, "train.threads")
    _positive(t.val_every_epochs, "train.val_every_epochs")
    _positive(cfg.checkpoint.every_epochs, "checkpoint.every_epochs", allow_zero=True)
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps", allow_zero=True)
    _positive(cfg.checkpoint.keep, "checkpoint.keep")
    _positive(cfg.dist.timeout_s, "dist.timeout_s")
    _positive(cfg.dist.bucket_cap_mb, "dist.bucket_cap_mb")
    _positive(cfg.dist.horovod.fusion_threshold_mb, "dist.horovod.fusion_threshold_mb",
              allow_zero=True)
    _positive(cfg.metrics.log_every, "metrics.log_every")
    _positive(cfg.metrics.warmup_steps, "metrics.warmup_steps", allow_zero=True)


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes and learning rate once the world size is known."""

    global_batch: int
    per_rank_batch: int
    micro_batch: int
    accum_steps: int
    lr: float


def resolve_batch(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Derive per-rank and micro-batch sizes and the scaled lr; check divisibility."""
    o = cfg.optim
    accum = o.grad_accum_steps
    if o.per_rank_batch_size is not None:
        if o.per_rank_batch_size % accum:
            raise UsageError(
                f"field 'optim.per_rank_batch_size': {o.per_rank_batch_size} is not divisible "
                f"by optim.grad_accum_steps={accum}"
            )
        global_batch = o.per_rank_batch_size * world_size
    else:
        global_batch = o.global_batch_size if o.global_batch_size is not None else 256
        if global_batch % (world_size * accum):
            raise UsageError(
                f"field 'optim.global_batch_size': {global_batch} is not divisible by "
                f"world_size * grad_accum_steps = {world_size} * {accum}"
            )
    per_rank = global_batch // world_size
    lr = o.lr * global_batch / o.base_batch_size if o.base_batch_size else o.lr
    return BatchPlan(global_batch, per_rank, per_rank // accum, accum, lr)


# --------------------------------------------------------------------------- documentation

def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def explain(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Lines ``path: default  # doc`` for every field, recursively."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{path}:  # {docs.get(f.name, '')}")
            lines.extend(explain(hints[f.name], path + "."))
        else:
            value = yaml.safe_dump(getattr(default, f.name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            doc = " ".join(docs.get(f.name, "").split())
            lines.append(f"{path}: {value}  # {doc}")
    return lines
