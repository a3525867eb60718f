"""Model registry: every model the trainer can build, by name.

Models are plain torch (torchvision does not import beside torch 2.13 here).
``build_model`` validates the name and options and raises
:class:`~scalelab.errors.UsageError` naming the config field, so a typo fails
before any process group is created.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scalelab.errors import UsageError

if TYPE_CHECKING:
    from scalelab.data.spec import DataSpec

#: name -> "module:function"; functions take (num_classes, image_shape, **opts).
_REGISTRY: dict[str, str] = {
    "cnn": "scalelab.models.cnn:small_cnn",
    "resnet18": "scalelab.models.resnet:resnet18",
    "resnet50": "scalelab.models.resnet:resnet50",
    "resnet": "scalelab.models.resnet:resnet",
    "vit": "scalelab.models.vit:vit",
    "gpt": "scalelab.models.gpt:gpt",  # num_classes = vocabulary, image_shape = (seq_len,)
}


def model_names() -> list[str]:
    """Names accepted by ``model.name``."""
    return sorted(_REGISTRY)


def _builder(name: str) -> Callable[..., Any]:
    if name not in _REGISTRY:
        raise UsageError(
            f"field 'model.name': unknown model {name!r}; valid: {', '.join(model_names())}"
        )
    import importlib

    module, func = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), func)


def check_model_options(name: str, opts: dict[str, Any]) -> None:
    """Raise UsageError for an unknown model name or option (no torch work)."""
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in ("num_classes", "image_shape")]
    for key in opts:
        if key not in allowed:
            raise UsageError(
                f"field 'model.options.{key}': not an option of model {name!r}; "
                f"valid: {', '.join(allowed) or '(none)'}"
            )


def build_model(name: str, num_classes: int, image_shape: tuple[int, int, int], **opts: Any):
    """Build model ``name`` for ``num_classes`` classes and images of ``image_shape`` (C, H, W)."""
    check_model_options(name, opts)
    if num_classes < 1:
        raise UsageError(f"field 'data.num_classes': must be >= 1, got {num_classes}")
    if len(image_shape) not in (1, 3) or min(image_shape) < 1:  # (C, H, W) or (seq_len,)
        raise UsageError(f"field 'data.image_shape': must be [C, H, W], got {list(image_shape)}")
    try:
        return _builder(name)(num_classes=num_classes, image_shape=tuple(image_shape), **opts)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"field 'model.options': {name}: {exc}") from None


def build(name: str, options: dict[str, Any], spec: DataSpec):
    """Model ``name`` with ``options`` for the data described by ``spec``: the one way the
    trainer, ``predict`` and ``evaluate`` build a model, so they build the same one."""
    return build_model(name, spec.num_outputs, spec.input_shape, **options)
